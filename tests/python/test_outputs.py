"""RequestOutput / CompletionOutput / Logprob: vLLM's field names, repr, merging deltas."""

from octavo.outputs import CompletionOutput, Logprob, RequestOutput


def make(text, ids, finish_reason=None):
    logprobs = [{i: Logprob(-0.5, rank=1, decoded_token=text)} for i in ids]
    return RequestOutput(
        request_id="0", prompt="Hi", prompt_token_ids=[1, 2], prompt_logprobs=None,
        outputs=[CompletionOutput(0, text, list(ids), -0.5 * len(ids), logprobs, finish_reason)],
        finished=finish_reason is not None)


def test_fields_and_repr():
    out = make(" there", [7, 8], "length")
    c = out.outputs[0]
    assert c.finished() and c.stop_reason is None and c.logprobs[0][7].rank == 1
    r = repr(out)
    assert r.startswith("RequestOutput(request_id=0, prompt='Hi', prompt_token_ids=[1, 2], ")
    assert "CompletionOutput(index=0, text=' there', token_ids=[7, 8], " in r
    assert "finish_reason=length" in r and "finished=True" in r


def test_add_aggregates_deltas_or_replaces():
    out = make("a", [1])
    out.add(make("b", [2], "stop"), aggregate=True)
    c = out.outputs[0]
    assert (c.text, c.token_ids, len(c.logprobs), c.finish_reason) == ("ab", [1, 2], 2, "stop")
    assert out.finished
    out.add(make("xyz", [3, 4, 5]), aggregate=False)
    assert out.outputs[0].text == "xyz"
