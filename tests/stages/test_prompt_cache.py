"""The encoder's cache of recent prompts' embeddings (`encoder.prompt_cache_size`): a repeated
prompt skips the text encoder and gets exactly what encoding it again gives, the least recently
used prompt leaves first, and callers can never change what the cache holds."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from deployments.config import EncoderConfig
from deployments.encoder import Encoder


def counting(encoder: Encoder) -> list[int]:
    """Count the text encoder's forwards (an instance attribute shadows the class's forward)."""
    calls = []
    forward = encoder.text_encoder.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    encoder.text_encoder.forward = counted
    return calls


@pytest.fixture
def make_encoder():
    return lambda size: Encoder(EncoderConfig(prompt_cache_size=size))


def test_a_repeated_prompt_skips_the_text_encoder_and_gets_the_same_embedding(make_encoder):
    cached, plain = make_encoder(4), make_encoder(0)
    calls = counting(cached)
    first = cached.encode_text("a cat talks")
    again = cached.encode_text("a cat talks")
    assert len(calls) == 1 and cached.prompt_cache_hits == 1
    assert torch.equal(first, again) and torch.equal(again, plain.encode_text("a cat talks"))
    # The same text after the pipeline's cleaning (whitespace, HTML entities) is the same prompt.
    assert torch.equal(cached.encode_text("  a cat   talks "), first) and len(calls) == 1
    assert not torch.equal(cached.encode_text("a dog talks"), first) and len(calls) == 2


def test_the_least_recently_used_prompt_leaves_first(make_encoder):
    encoder = make_encoder(2)
    calls = counting(encoder)
    for prompt in ("one", "two", "one", "three"):  # "two" is the least recently used when "three" comes
        encoder.encode_text(prompt)
    assert len(calls) == 3
    encoder.encode_text("one")
    assert len(calls) == 3  # kept
    encoder.encode_text("two")
    assert len(calls) == 4  # evicted, encoded again
    assert encoder.info()["prompt_cache"] == {"prompts": 2, "hits": 2}


def test_size_zero_keeps_nothing(make_encoder):
    encoder = make_encoder(0)
    calls = counting(encoder)
    encoder.encode_text("same")
    encoder.encode_text("same")
    assert len(calls) == 2 and encoder.info()["prompt_cache"] == {"prompts": 0, "hits": 0}


def test_a_caller_changing_its_embedding_does_not_change_the_cache(make_encoder):
    encoder = make_encoder(4)
    first = encoder.encode_text("a cat talks")
    expected = first.clone()
    first.fill_(7.0)
    again = encoder.encode_text("a cat talks")
    assert torch.equal(again, expected)
    again.zero_()
    assert torch.equal(encoder.encode_text("a cat talks"), expected)


def test_requests_at_once_through_the_stage_get_what_they_get_alone(make_encoder):
    """Ray runs the replica's sync methods in a thread pool: encodes of repeated and new prompts
    at once (the cache read and filled from several threads) give each what it gets alone."""
    from deployments.common.transport import unpack
    from helpers import get_dummy_image, get_dummy_params

    prompts = ["a cat talks", "a dog sings", "a cat talks", "an owl", "a dog sings", "a cat talks"]
    params = [get_dummy_params(prompt=p, seed=i, num_inference_steps=2, guidance_scale=1.0, guidance_scale_2=1.0)
              for i, p in enumerate(prompts)]
    alone = [unpack(make_encoder(0).encode(p, get_dummy_image(i)).prompt_embeds) for i, p in enumerate(params)]
    encoder = make_encoder(2)  # smaller than the prompts: eviction happens under load too
    for _ in range(2):
        with ThreadPoolExecutor(len(params)) as pool:
            together = list(pool.map(lambda ip: unpack(encoder.encode(ip[1], get_dummy_image(ip[0])).prompt_embeds),
                                     enumerate(params)))
        for a, b in zip(alone, together):
            assert torch.equal(a, b)
    assert encoder.prompt_cache_hits > 0
