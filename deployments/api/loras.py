"""The ingress's LoRA admin (the /v1/admin/loras routes): LoRA files confined to
`serving.lora_dirs`, loaded, activated and removed on the experts a request targets -- only
those. A part of `Ingress` (deployments/ingress.py), which has the expert handles and the config."""

from __future__ import annotations

import os

from deployments.api.lora_request import LoraList, available
from deployments.api.protocol import ApiError, LoraActivate, LoraRequest
from deployments.common.errors import unwrap


class LoraAdmin:
    """Mixed into `Ingress`: uses its `high`, `low` (expert handles) and `cfg`."""

    def _experts(self, target: str) -> list:
        return [self.high, self.low] if target == "both" else [self.high if target == "high" else self.low]

    async def _on_experts(self, target: str, call) -> dict:
        """Run `call(handle)` on the experts `target` names (only those). A refusal raises the
        stage's own error type (LoraError, LoraBusyError, MissingWeightsError), unwrapped."""
        try:
            results = [await call(h) for h in self._experts(target)]
        except Exception as exc:  # noqa: BLE001 - Ray wraps stage errors; hand on the original
            raise unwrap(exc) from None
        return {r["role"]: r for r in results}

    def lora_path(self, path: str) -> str:
        """A LoRA path confined to `serving.lora_dirs` (symlinks resolved first; a relative path is
        taken inside the first folder), or 422 -- the same answer whether such a file exists or not."""
        folders = [os.path.realpath(d) for d in self.cfg.serving.lora_dirs]
        if not folders:
            raise ApiError(422, "path: LoRA loading is off here (no serving.lora_dirs configured)", "path")
        resolved = os.path.realpath(os.path.join(folders[0], path))
        if not any(os.path.commonpath([resolved, folder]) == folder for folder in folders):
            raise ApiError(422, "path: LoRA files are loaded only from the configured LoRA folders", "path")
        return resolved

    async def load_lora(self, req: LoraRequest) -> dict:
        path = self.lora_path(req.path)
        return await self._on_experts(req.target, lambda h: h.load_lora.remote(req.name, path, req.strength,
                                                                                 req.target))

    async def activate_loras(self, req: LoraActivate) -> dict:
        return await self._on_experts(req.target, lambda h: h.activate_loras.remote(req.names, req.strengths))

    async def remove_lora(self, name: str, target: str = "both") -> dict:
        return await self._on_experts(target, lambda h: h.remove_lora.remote(name))

    async def list_loras(self) -> dict:
        return await self._on_experts("both", lambda h: h.list_loras.remote())

    def request_loras(self) -> LoraList:
        """GET /v1/loras: the names a request's `loras` may use (README: Per-request LoRAs)."""
        return available(self.cfg)
