"""Our FAN and S3FD ports against the reference implementation, the `face-alignment` package
(1adrianb/face-alignment, test-only dependency, pinned in the Makefile), on the same random weights.

Only the reference's network and box modules are imported: `face_alignment/models/fan.py`,
`face_alignment/detection/sfd/{net_s3fd,bbox,detect,sfd_detector}.py`. The package's own
`__init__` (and `face_alignment.utils` / `detection.core`) import OpenCV, scikit-image, numba and
scipy, about 180 MB of wheels that nothing here needs: the Makefile installs face-alignment with
`--no-deps` (which also guarantees it never touches the pinned torch), and `_reference` below
loads those files as submodules of a private package whose `__init__`s are empty, with
`detection.core` (helpers for image files and flipping) stubbed.

Tolerances: both sides run the same float32 ops in the same order on the CPU; the heatmaps and
head outputs agree to 1e-5 relative (measured: bit-identical on torch 2.13 CPU), boxes to 1e-3 px (ours decode
in float32, the reference in float64).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from deployments.models.faces.fan import load_fan
from deployments.models.faces.s3fd import detect_faces, load_s3fd

_PREFIX = "_face_alignment_reference"


def _reference():
    """The reference package's directory, or skip (fail under CI, where the Makefile installs it)."""
    spec = importlib.util.find_spec("face_alignment")  # locates it without importing it
    if spec is None or spec.origin is None:
        if os.environ.get("CI"):
            pytest.fail("face-alignment is not installed (the Makefile installs it for the tests)")
        pytest.skip("face-alignment is not installed: `pip install --no-deps face-alignment==1.5.0`")
    root = Path(spec.origin).parent
    if _PREFIX not in sys.modules:
        for name, folder in [("", root), (".models", root / "models"), (".detection", root / "detection"),
                             (".detection.sfd", root / "detection" / "sfd")]:
            package = types.ModuleType(_PREFIX + name)
            package.__path__ = [str(folder)]
            sys.modules[_PREFIX + name] = package
        core = types.ModuleType(f"{_PREFIX}.detection.core")
        core.FaceDetector = object  # the base class of SFDDetector (file and tensor helpers)
        core.flip_detect = core.pts_to_bb = None
        sys.modules[core.__name__] = core
    return types.SimpleNamespace(**{
        name: importlib.import_module(f"{_PREFIX}.{module}") for name, module in [
            ("fan", "models.fan"), ("net_s3fd", "detection.sfd.net_s3fd"),
            ("detect", "detection.sfd.detect"), ("sfd_detector", "detection.sfd.sfd_detector")]})


def _randomise_batchnorm(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (eval mode uses them)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(c, generator=generator) * 0.5 + 0.75)
            module.weight.data.copy_(torch.rand(c, generator=generator) * 0.5 + 0.75)
            module.bias.data.copy_(torch.randn(c, generator=generator) * 0.1)


def _published(state: dict) -> dict:
    """A state dict as the published files are: flat, without BatchNorm step counters."""
    return {k: v.clone() for k, v in state.items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("stacks,size", [(1, 256), (4, 64)])  # 4 stacks at 256 take ~30 s on 2 cores
def test_fan_matches_face_alignment_on_the_same_weights(stacks, size, tmp_path):
    ref = _reference()
    generator = torch.Generator().manual_seed(stacks)
    torch.manual_seed(stacks)
    reference = ref.fan.FAN(stacks)
    with torch.no_grad():
        _randomise_batchnorm(reference, generator)
    reference.eval()
    path = tmp_path / "2DFAN.pth.tar"
    torch.save(_published(reference.state_dict()), path)
    ours = load_fan(path)  # our loader: stack count from the file, strict
    assert ours.num_modules == stacks
    x = torch.rand(2, 3, size, size, generator=generator)
    with torch.no_grad():
        expected = reference(x)
        got = ours(x, all_stacks=True)
    assert len(got) == len(expected) == stacks
    for a, b in zip(got, expected):
        assert a.shape == b.shape == (2, 68, size // 4, size // 4)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_s3fd_matches_face_alignment_on_the_same_weights(tmp_path):
    ref = _reference()
    torch.manual_seed(7)
    reference = ref.net_s3fd.s3fd().eval()
    path = tmp_path / "s3fd.pth"
    torch.save(reference.state_dict(), path)
    ours = load_s3fd(path)
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(8)) * 60
    with torch.no_grad():
        expected = reference(x.clone())
        got = ours(x.clone())
    assert len(got) == len(expected) == 12
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_s3fd_detections_match_face_alignment(tmp_path):
    """Whole detector: the reference's `batch_detect` (BGR flip, mean, softmax, anchors, decoding)
    and `SFDDetector._filter_bboxes` (NMS 0.3, then score > 0.5) against our `detect_faces`."""
    ref = _reference()
    torch.manual_seed(11)
    reference = ref.net_s3fd.s3fd().eval()
    with torch.no_grad():
        for module in reference.modules():  # moderate activations, so the scores do not saturate
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(0.5)
    path = tmp_path / "s3fd.pth"
    torch.save(reference.state_dict(), path)
    ours = load_s3fd(path)
    frame = np.random.default_rng(12).integers(0, 256, (96, 128, 3), dtype=np.uint8)

    batch = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
    candidates = ref.detect.batch_detect(reference, batch, "cpu")[0]
    kept = ref.sfd_detector.SFDDetector._filter_bboxes(types.SimpleNamespace(filter_threshold=0.5),
                                                        candidates)
    expected = np.array(kept, dtype=np.float64).reshape(-1, 5)
    expected[:, 0:4:2] = expected[:, 0:4:2].clip(0, frame.shape[1])  # ours clip to the frame
    expected[:, 1:4:2] = expected[:, 1:4:2].clip(0, frame.shape[0])
    got = detect_faces(ours, frame)
    assert len(expected) >= 3, "the weights should give a few detections to compare"
    assert got.shape == expected.shape
    np.testing.assert_allclose(got[:, :4], expected[:, :4], atol=1e-3)
    np.testing.assert_allclose(got[:, 4], expected[:, 4], atol=1e-5)
