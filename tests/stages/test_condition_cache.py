"""The encoder's cache of recent portraits' image conditions (`encoder.condition_cache_bytes`): a
repeated portrait skips the VAE and gets exactly the condition encoding it again gives; another
size, frame count or one changed pixel is another entry; the cache is bounded in bytes; nobody
can change what it holds; requests at once through the stage get what they get alone."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from deployments.common.cache import LruCache
from deployments.config import EncoderConfig
from deployments.encoder import Encoder
from helpers import get_dummy_image, get_dummy_params


def counting_vae(encoder: Encoder) -> list[int]:
    calls, encode = [], encoder.vae.encode

    def counted(*args, **kwargs):
        calls.append(1)
        return encode(*args, **kwargs)

    encoder.vae.encode = counted
    return calls


@pytest.fixture(scope="module")
def plain():
    return Encoder(EncoderConfig(condition_cache_bytes=0))


def params(**kw):
    return get_dummy_params(**{"guidance_scale": 1.0, "guidance_scale_2": 1.0, **kw})


def test_a_repeated_portrait_skips_the_vae_and_gets_the_same_condition(plain):
    encoder = Encoder(EncoderConfig())
    calls = counting_vae(encoder)
    image = get_dummy_image(3)
    first = encoder.encode(params(seed=1), image).condition.data
    again = encoder.encode(params(seed=2, prompt="another prompt"), image.copy()).condition.data  # equal pixels
    assert len(calls) == 1 and encoder.info()["condition_cache"]["hits"] == 1
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(again, plain.encode(params(seed=1), image).condition.data)
    assert again.dtype == plain.encode(params(seed=1), image).condition.data.dtype


@pytest.mark.parametrize("change", ["pixel", "size", "frames"])
def test_another_pixel_size_or_frame_count_is_encoded_again(plain, change):
    encoder = Encoder(EncoderConfig())
    calls = counting_vae(encoder)
    image = get_dummy_image(4)
    encoder.encode(params(), image)
    other_image, other = image, params()
    if change == "pixel":
        other_image = image.copy()
        other_image[0, 0, 0] ^= 1
    elif change == "size":
        other = params(width=32)
    else:
        other = params(num_frames=5)
    got = encoder.encode(other, other_image).condition.data
    assert len(calls) == 2
    np.testing.assert_array_equal(got, plain.encode(other, other_image).condition.data)


def test_the_cache_is_bounded_in_bytes_and_drops_the_least_recent():
    one = Encoder(EncoderConfig()).encode(params(), get_dummy_image(0)).condition.data.nbytes
    encoder = Encoder(EncoderConfig(condition_cache_bytes=2 * one))
    calls = counting_vae(encoder)
    for seed in (0, 1, 0, 2):  # portrait 1 is the least recently used when portrait 2 comes
        encoder.encode(params(), get_dummy_image(seed))
    assert len(calls) == 3 and encoder.info()["condition_cache"]["bytes"] == 2 * one
    encoder.encode(params(), get_dummy_image(0))
    assert len(calls) == 3
    encoder.encode(params(), get_dummy_image(1))
    assert len(calls) == 4


def test_zero_bytes_keeps_nothing(plain):
    calls = counting_vae(plain)
    plain.encode(params(), get_dummy_image(5))
    plain.encode(params(), get_dummy_image(5))
    assert len(calls) == 2 and plain.info()["condition_cache"]["entries"] == 0


def test_what_the_cache_holds_cannot_be_changed():
    encoder = Encoder(EncoderConfig())
    held = encoder.encode(params(), get_dummy_image(6)).condition.data
    with pytest.raises(ValueError):
        held[...] = 0
    from deployments.common.transport import unpack

    mine = unpack(encoder.encode(params(), get_dummy_image(6)).condition)  # a copy of one's own
    mine.zero_()
    assert np.abs(encoder.encode(params(), get_dummy_image(6)).condition.data).sum() > 0


def test_requests_at_once_get_what_they_get_alone(plain):
    """Ray runs the replica's sync methods in a thread pool: encodes of repeated and new portraits
    at once (the cache read and filled from several threads, evicting as it goes) give each
    request what it gets alone."""
    jobs = [(params(seed=i, num_frames=[9, 5][i % 2]), get_dummy_image([0, 1, 0, 2, 1, 0][i])) for i in range(6)]
    alone = [plain.encode(p, im).condition.data for p, im in jobs]
    one = alone[0].nbytes
    encoder = Encoder(EncoderConfig(condition_cache_bytes=2 * one))  # smaller than the set: evictions under load
    for _ in range(2):
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda job: encoder.encode(*job).condition.data, jobs))
        for a, b in zip(alone, together):
            np.testing.assert_array_equal(a, b)
    assert encoder.info()["condition_cache"]["hits"] > 0


def test_an_entry_larger_than_the_bound_is_not_kept():
    cache: LruCache[str] = LruCache(max_bytes=10)
    cache.put("big", "x", nbytes=11)
    cache.put("small", "y", nbytes=4)
    assert cache.get("big") is None and cache.get("small") == "y"
    assert cache.stats() == {"entries": 1, "bytes": 4, "hits": 1, "misses": 1}
