import json

from hypothesis import given
from hypothesis import strategies as st

from echolm.domain import ErrorCode
from streams.batch_format import (
    ParsedLine,
    RejectedLine,
    done_ids,
    output_id,
    parse_line,
    rejected_output,
    response_output,
)
from streams.records import ErrorInfo, Message, ResponseRecord, RouteInfo


def _line(custom_id="a", messages=None, **extra):
    body = {"messages": messages or [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 16}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body, **extra})


def test_valid_line_becomes_a_request_with_a_content_derived_id():
    first = parse_line(1, _line(), "default", set())
    again = parse_line(7, _line(), "default", set())
    assert isinstance(first, ParsedLine) and isinstance(again, ParsedLine)
    assert first.request.request_id == again.request.request_id  # same content, same id: resumable
    assert first.request.custom_id == "a"
    assert first.request.max_tokens == 16
    assert first.request.tenant == "default"


def test_tenant_field_and_body_change_give_new_ids():
    base = parse_line(1, _line(), "default", set())
    other_tenant = parse_line(1, _line(tenant="acme"), "default", set())
    other_body = parse_line(1, _line(messages=[{"role": "user", "content": "3+3?"}]), "default", set())
    assert isinstance(other_tenant, ParsedLine) and other_tenant.request.tenant == "acme"
    ids = {base.request.request_id, other_tenant.request.request_id, other_body.request.request_id}
    assert len(ids) == 3


def test_rejections_say_what_is_wrong_with_the_line():
    cases = {
        "{not json": "not valid JSON",
        "[1, 2]": "expected a JSON object",
        json.dumps({"body": {}}): "custom_id",
        json.dumps({"custom_id": "x", "url": "/v1/embeddings", "body": {}}): "unsupported url",
        json.dumps({"custom_id": "x", "body": {"messages": []}}): "messages",
        json.dumps({"custom_id": "x", "body": {"messages": [{"role": "robot", "content": "hi"}]}}): "role",
        json.dumps({"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": -3}}): "max_tokens",
        json.dumps({"custom_id": "x", "tenant": "bad tenant!", "body": {"messages": [
            {"role": "user", "content": "hi"}]}}): "tenant",
    }
    for raw, expected in cases.items():
        result = parse_line(3, raw, "default", set())
        assert isinstance(result, RejectedLine), raw
        assert result.code is ErrorCode.INVALID_REQUEST
        assert result.message.startswith("line 3: ")
        assert expected in result.message, (raw, result.message)


def test_duplicate_custom_id_is_rejected_but_first_is_kept():
    seen: set[str] = set()
    assert isinstance(parse_line(1, _line("dup"), "default", seen), ParsedLine)
    second = parse_line(2, _line("dup", messages=[{"role": "user", "content": "other"}]), "default", seen)
    assert isinstance(second, RejectedLine) and "duplicate custom_id" in second.message


@given(st.binary(max_size=200))
def test_any_garbage_line_gets_a_rejection_or_a_request_never_an_exception(raw):
    text = raw.decode("utf-8", "replace")
    result = parse_line(1, text, "default", set())
    assert isinstance(result, ParsedLine | RejectedLine)
    if isinstance(result, RejectedLine):
        assert rejected_output(result)["error"]["code"] == "invalid_request"


def test_outputs_roundtrip_through_done_ids():
    rejected = parse_line(4, "garbage", "default", set())
    assert isinstance(rejected, RejectedLine)
    ok = ResponseRecord(
        request_id="req-1", tenant="t", custom_id="c1", messages=[Message(role="user", content="q")],
        text="answer", tier="small", model="m", prompt_tokens=3, cached_prompt_tokens=2, completion_tokens=2,
        route=RouteInfo(tier="small", score=0.9, reason="close examples", use_examples=True),
        submitted_at=100.0, finished_at=101.5,
    )
    failed = ResponseRecord(
        request_id="req-2", tenant="t", custom_id="c2", messages=[],
        error=ErrorInfo(code=ErrorCode.GENERATION_TIMEOUT, message="took too long", stage="generate.large"),
        submitted_at=100.0,
    )
    lines = [json.dumps(rejected_output(rejected)), json.dumps(response_output(ok)),
             json.dumps(response_output(failed)), '{"torn": ']
    assert done_ids(lines) == {output_id(rejected.request_id), output_id("req-1"), output_id("req-2")}

    body = response_output(ok)["response"]["body"]
    assert body["choices"][0]["message"]["content"] == "answer"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    assert body["echolm"]["tier"] == "small"
    assert body["echolm"]["latency_s"] == 1.5
    error = response_output(failed)
    assert error["response"] is None and error["error"]["code"] == "generation_timeout"
