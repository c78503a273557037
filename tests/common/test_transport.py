import numpy as np
import pytest
import torch

from deployments.common.transport import WireTensor, pack, pack_tree, unpack, unpack_tree


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8])
def test_pack_unpack_is_bit_exact(dtype):
    t = (torch.randn(3, 5, 7) * 100).to(dtype)
    wire = pack(t)
    assert isinstance(wire.data, np.ndarray)
    assert wire.dtype == str(dtype).removeprefix("torch.")
    back = unpack(wire)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8) if dtype.is_floating_point else back,
                       t.view(torch.uint8) if dtype.is_floating_point else t)


def test_bf16_travels_as_uint16_view():
    wire = pack(torch.ones(4, dtype=torch.bfloat16))
    assert wire.data.dtype == np.uint16
    assert int(wire.data[0]) == 0x3F80  # bf16 bit pattern of 1.0


def test_unpack_accepts_read_only_arrays_and_copies():
    # Ray delivers numpy arrays read-only and zero-copy.
    arr = np.arange(6, dtype=np.float32)
    arr.setflags(write=False)
    t = unpack(WireTensor(arr, "float32"))
    t += 1  # must not write into (or fail on) the read-only buffer
    assert arr[0] == 0 and float(t[0]) == 1


def test_mismatched_tag_is_refused():
    with pytest.raises(ValueError, match="tagged"):
        unpack(WireTensor(np.zeros(2, dtype=np.float64), "float32"))


def test_tree_roundtrip_keeps_structure():
    tree = {"a": [torch.ones(2), None, 3], "b": (torch.zeros(1, dtype=torch.bfloat16),)}
    packed = pack_tree(tree)
    assert isinstance(packed["a"][0], WireTensor) and isinstance(packed["b"], tuple)
    back = unpack_tree(packed)
    assert torch.equal(back["a"][0], tree["a"][0]) and back["a"][1:] == [None, 3]
    assert back["b"][0].dtype == torch.bfloat16
