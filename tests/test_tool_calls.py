"""OpenAI's tool calls on hotcold server, in llama.cpp's generic format: the reply's schema, the conversation as the
chat template sees it, and real requests to SmolLM2."""
import json
import threading
import urllib.error
import urllib.request

import pytest

from engine.config import HotcoldError
from engine.schema import grammar_for
from tools import tool_calls
from tools.cli import build_parser
from tools.server import Server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


def whole(g, text: str) -> bool:
    state = g.advance(g.start, text.encode())
    return state is not None and g.complete(state)


def test_the_reply_schema_calls_the_tools_or_answers():
    """auto: a call of a listed tool with arguments its schema takes, or an answer; required and a named tool: a call
    (of that tool); parallel_tool_calls false: one call; none: no tools."""
    call = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'
    two = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, ' \
          '{"name": "get_time", "arguments": {"zone": "CET"}}]}'
    answer = '{"response": "It is sunny."}'
    for body, takes, refuses in (
            ({"tools": [WEATHER, TIME]}, [call, two, answer],
             ['{"tool_calls": [{"name": "get_time", "arguments": {"zone": "PST"}}]}', '{"tool_calls": []}',
              '{"tool_calls": [{"name": "get_wind", "arguments": {}}]}', '{"response": 3}']),
            ({"tools": [WEATHER, TIME], "tool_choice": "required"}, [call, two], [answer]),
            ({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
             ['{"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}]}'], [call, answer]),
            ({"tools": [WEATHER, TIME], "parallel_tool_calls": False}, [call, answer], [two])):
        plan = tool_calls.plan(body)
        g = grammar_for(plan.schema)
        assert all(whole(g, t) for t in takes) and not any(whole(g, t) for t in refuses), body
        choice = body.get("tool_choice")
        named = [choice["function"]["name"]] if isinstance(choice, dict) else [t["function"]["name"] for t in body[
            "tools"]]
        assert all(f'"name": "{n}"' in plan.system for n in named)  # the tools it may call, described
        assert ("to answer the user" in plan.system) == (choice is None)
    assert tool_calls.plan({"tools": [WEATHER], "tool_choice": "none"}) is None and tool_calls.plan({}) is None
    for body, why in (({"tools": [{"function": {"name": "bad name"}}]}, "tools: a list of"),
                      ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice: "),
                      ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
                       "names no tool of the request"),
                      ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls: true or false"),
                      ({"tool_choice": "required"}, "required, and no tools")):
        with pytest.raises(HotcoldError, match=why):
            tool_calls.plan(body)


def test_the_conversation_holds_earlier_calls_and_results_as_the_model_writes_them():
    plan = tool_calls.plan({"tools": [WEATHER]})
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    got = tool_calls.conversation(messages, plan)
    assert got[0] == {"role": "system", "content": "Be brief.\n\n" + plan.system} and got[1] == messages[1]
    assert json.loads(got[2]["content"]) == {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    assert got[3]["role"] == "user" and json.loads(got[3]["content"]) == {
        "tool_response": {"tool_call_id": "call_1", "content": "sunny"}}
    assert tool_calls.conversation(messages[1:2], plan)[0] == {"role": "system", "content": plan.system}
    assert tool_calls.conversation(messages, None)[0] == messages[0]  # results of earlier calls, no tools now
    assert tool_calls.reply('{"response": "Hi"}') == ("Hi", None)
    content, calls = tool_calls.reply('{"tool_calls": [{"name": "f", "arguments": {"a": [1]}}]}')
    assert content is None and calls[0]["function"] == {"name": "f", "arguments": '{"a": [1]}'}
    assert calls[0]["id"].startswith("call_") and tool_calls.reply('{"resp') == ('{"resp', None)


def post(srv, path: str, body: dict):
    req = urllib.request.Request(srv.url + path, data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_server_tool_calls(smollm):
    """SmolLM2 asked for the weather with a weather tool: OpenAI's tool_calls (finish_reason tool_calls), streamed as
    one delta that holds the same call; tool_choice none answers in text; a tool result in the conversation is
    taken; tools beside a response_format, or on /v1/completions, are a 400."""
    srv = Server(smollm, build_parser("server").parse_args(["server"]), "127.0.0.1", 0)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    try:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        base = {"messages": ask, "tools": [WEATHER, TIME], "parallel_tool_calls": False, "temperature": 0,
                "max_tokens": 80}
        status, got = post(srv, "/v1/chat/completions", base)
        choice = json.loads(got)["choices"][0]
        call, = choice["message"]["tool_calls"]
        assert status == 200 and choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
            "city": "Paris"}
        status, got = post(srv, "/v1/chat/completions", {**base, "stream": True})
        events = [json.loads(line[6:]) for line in got.splitlines() if line.startswith("data: {")]
        deltas = [e["choices"][0]["delta"] for e in events]
        assert deltas[0] == {"role": "assistant", "content": ""} and events[-1]["choices"][0]["finish_reason"] == \
            "tool_calls"
        streamed, = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
        assert streamed["index"] == 0 and streamed["function"] == call["function"] and got.endswith("[DONE]\n\n")
        status, got = post(srv, "/v1/chat/completions", {**base, "tool_choice": "none", "max_tokens": 8})
        assert status == 200 and "tool_calls" not in json.loads(got)["choices"][0]["message"]
        after = ask + [choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 C"}]
        status, got = post(srv, "/v1/chat/completions", {**base, "messages": after})
        assert status == 200 and json.loads(got)["choices"][0]["finish_reason"] in ("stop", "tool_calls")
        for path, body, why in (("/v1/chat/completions", {**base, "response_format": {"type": "json_object"}},
                                 "tools and a response_format"),
                                ("/v1/completions", {"prompt": "Hi", "tools": [WEATHER]}, "tools: with /v1/chat"),
                                ("/v1/chat/completions", {**base, "tool_choice": "sometimes"}, "tool_choice")):
            status, got = post(srv, path, body)
            assert status == 400 and why in json.loads(got)["error"]["message"], got
    finally:
        srv.shutdown()
        srv.server_close()
