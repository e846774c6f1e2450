"""Engine behaviour through its public API on the bundled model: sampling, stops, aborts, bad input."""
from __future__ import annotations

import pytest
import torch

from orca.engine import LLM, SamplingParams
from orca.engine.sampler import apply_penalties, filter_logits
from orca.engine.sequence import Sequence

from conftest import drain

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", kv_cache_memory="256MiB", max_model_len=256)


def test_seeded_sample_is_independent_of_the_batch(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate("Once upon a time", params, use_tqdm=False)[0]
    busy = llm.generate(
        ["Write a poem about the sea", "Once upon a time", "1, 2, 3, 4,", "Explain TCP in one line"],
        [SamplingParams(temperature=1.0, max_tokens=30), params, SamplingParams(temperature=0.7, seed=9, max_tokens=5),
         SamplingParams(temperature=0.0, max_tokens=12)], use_tqdm=False)[1]
    assert busy.token_ids == alone.token_ids and busy.text == alone.text
    other_seed = llm.generate("Once upon a time", SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=24,
                                                                  ignore_eos=True), use_tqdm=False)[0]
    assert other_seed.token_ids != alone.token_ids


def test_truncation_filters_reduce_to_greedy(llm: LLM) -> None:
    greedy = llm.generate("The sky is", SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)[0].token_ids
    for params in [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)]:
        out = llm.generate("The sky is", SamplingParams(temperature=1.0, max_tokens=10, **params), use_tqdm=False)[0]
        assert out.token_ids == greedy, params


def test_filter_and_penalty_math() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, torch.tensor([2]), torch.tensor([1.0]), torch.tensor([0.0]))[0, 2:]).all()
    probs = logits.softmax(-1)[0]  # ~[.64, .24, .09, .03]: top_p=0.7 keeps two tokens
    kept = filter_logits(logits, torch.tensor([-1]), torch.tensor([0.7]), torch.tensor([0.0]))
    assert torch.isfinite(kept[0]).tolist() == [True, True, False, False], probs
    kept = filter_logits(logits, torch.tensor([-1]), torch.tensor([1.0]), torch.tensor([0.3]))
    assert torch.isfinite(kept[0]).tolist() == [True, True, False, False]
    seq = Sequence("p", [0], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0))
    seq.token_ids += [1, 1, 3]
    out = apply_penalties(logits.clone(), [seq])[0].tolist()
    # token 0 (prompt only): repetition; 1 (twice): repetition + presence + 2*frequency; 3: logit 0 stays 0 - 0.75
    assert out == pytest.approx([1.5, 1.0 - 0.5 - 0.5, 1.0, 0.0 - 0.5 - 0.25])


def test_stop_conditions(llm: LLM) -> None:
    base = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 20
    stop_str = base.text[5:8]
    cut = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0.0, max_tokens=20, stop=[stop_str]),
                       use_tqdm=False)[0]
    assert cut.finish_reason == "stop" and cut.text == base.text[:base.text.index(stop_str)]
    tok = base.token_ids[3]
    by_id = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[tok]),
                         use_tqdm=False)[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == base.token_ids[:base.token_ids.index(tok) + 1]
    chat = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0.0, max_tokens=100),
                    use_tqdm=False)[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] in llm.engine.model_config.eos_token_ids
    assert "<|im_end|>" not in chat.text


def test_streamed_deltas_add_up(llm: LLM) -> None:
    e = llm.engine
    e.add_request("stream", "Write a sentence with emoji 🎉 and accents: café", SamplingParams(
        temperature=0.0, max_tokens=40, stop=["\n\n"]))
    pieces, final = [], None
    while e.has_unfinished_requests():
        for o in e.step():
            assert "\ufffd" not in o.new_text
            pieces.append(o.new_text)
            final = o
    e.release("stream")
    assert final is not None and final.finished and "".join(pieces) == final.text


def test_logprobs(llm: LLM) -> None:
    out = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=5, logprobs=3),
                       use_tqdm=False)[0]
    assert len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and len(lp) >= 3 and all(v <= 0 for v in lp.values())
        assert lp[tok] == pytest.approx(max(lp.values()))  # greedy picks the most likely token


def test_abort_frees_blocks_and_others_continue(llm: LLM) -> None:
    e, bm = llm.engine, llm.engine.block_manager
    free0 = bm.num_free_blocks
    e.add_request("keep", "Tell me about whales.", SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    e.add_request("drop", "Tell me about sharks.", SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    for _ in range(3):
        e.step()
    e.abort_request("drop")
    done = drain(llm)
    assert list(done) == ["keep"] and len(done["keep"].token_ids) == 16
    assert bm.num_free_blocks == free0


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompts=""), "prompt"),
    (dict(prompts="word " * 300), "prompt"),
    (dict(prompts="hi", sampling_params=SamplingParams(max_tokens=300)), "max_tokens"),
    (dict(prompt_token_ids=[[1, 10**9]]), "prompt"),
])
def test_bad_input_names_the_field_and_engine_keeps_serving(llm: LLM, kwargs: dict, field: str) -> None:
    e = llm.engine
    e.add_request("inflight", "Name a colour.", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    e.step()
    with pytest.raises(ValueError, match=field):
        llm.generate(use_tqdm=False, **kwargs)
    done = drain(llm)
    assert len(done["inflight"].token_ids) == 8
    assert llm.generate("Name a fruit.", SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0].token_ids


def test_max_tokens_that_can_never_fit_the_pool() -> None:
    small = LLM(dtype="float32", kv_cache_memory=str(40 * 16 * 2 * 30 * 3 * 64 * 4))  # 40 blocks = 640 tokens
    with pytest.raises(ValueError, match="max_tokens.*KV blocks"):
        small.generate("hi", SamplingParams(max_tokens=700), use_tqdm=False)
    assert small.generate("hi", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0].token_ids
