"""OpenAI's tool calls for hotcold server, in llama.cpp's generic format (for chat templates that know no tools): the
tools are described in a system message, the reply is held by their JSON schema to an object that calls them,
{"tool_calls": [{"name", "arguments"}]}, or answers, {"response": text}, and it is read back into OpenAI's
tool_calls. Earlier calls in the conversation are written as that JSON, and the tools' results as user messages
{"tool_response": {"tool_call_id", "content"}} (the polyfill llama.cpp applies to such templates).
"""
from __future__ import annotations

import json
import re
import uuid
from typing import NamedTuple

from engine.config import HotcoldError

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's function names


class ToolPlan(NamedTuple):
    system: str  # what the system message says of the tools
    schema: dict  # the reply's JSON schema


def plan(body: dict) -> ToolPlan | None:
    """The request's tools, tool_choice and parallel_tool_calls; None when no tool may be called."""
    tools, choice = body.get("tools") or [], body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) and NAME.fullmatch(t["function"]["name"])
            and isinstance(t["function"].get("description", ""), str) for t in tools):
        raise HotcoldError('tools: a list of {"type": "function", "function": {"name" (letters, digits, _ and -, at '
                           'most 64), "description", "parameters" (a JSON schema)}}')
    if not isinstance(parallel, bool):
        raise HotcoldError(f"parallel_tool_calls: true or false, got {json.dumps(parallel)}")
    functions = {t["function"]["name"]: t["function"] for t in tools}
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        if name not in functions:
            raise HotcoldError(f"tool_choice: {json.dumps(choice)} names no tool of the request")
        functions, choice = {name: functions[name]}, "required"
    elif choice not in (None, "auto", "none", "required"):
        raise HotcoldError(f'tool_choice: "auto", "none", "required" or {{"type": "function", "function": {{"name": '
                           f'...}}}}, got {json.dumps(choice)}')
    if not functions or choice == "none":
        if choice == "required":
            raise HotcoldError("tool_choice: required, and no tools")
        return None
    call = [{"type": "object", "properties": {"name": {"const": name}, "arguments": f.get("parameters") or
                                              {"type": "object"}}, "required": ["name", "arguments"]}
            for name, f in functions.items()]
    calls = {"type": "array", "items": call[0] if len(call) == 1 else {"anyOf": call}, "minItems": 1,
             **({} if parallel else {"maxItems": 1})}
    calling = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]}
    answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
    listed = json.dumps([{"name": name, "description": f.get("description", ""),
                          "parameters": f.get("parameters") or {"type": "object"}} for name, f in functions.items()],
                        ensure_ascii=False, indent=1)
    forms = ('{"tool_calls": [{"name": "...", "arguments": {...}}]} to call ' +
             ("tools" if parallel else "one tool") + ("" if choice == "required" else
                                                      ', or {"response": "..."} to answer the user'))
    system = (f"You can call these tools:\n{listed}\n\nReply with one JSON object: {forms}.")
    return ToolPlan(system, calling if choice == "required" else {"anyOf": [calling, answer]})


def conversation(messages, tools: ToolPlan | None) -> list:
    """The request's messages for the chat template: the tools' description in the first system message (one made
    where there is none; with tools), earlier tool calls as the JSON the model writes, tool results as user
    messages."""
    if not isinstance(messages, list):
        return messages  # (chat_prompt names what is wrong)
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "tool":
            content = m.get("content")
            if not isinstance(content, str):
                raise HotcoldError(f"messages[{i}].content: a tool's result as a string")
            m = {"role": "user", "content": json.dumps({"tool_response": {
                "tool_call_id": m.get("tool_call_id"), "content": content}}, ensure_ascii=False)}
        elif isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls"):
            m = {"role": "assistant", "content": json.dumps({"tool_calls": [written(i, c) for c in m["tool_calls"]]},
                                                            ensure_ascii=False)}
        out.append(m)
    if tools is None:
        return out
    if out and isinstance(out[0], dict) and out[0].get("role") in ("system", "developer") and \
            isinstance(out[0].get("content"), str):
        return [{"role": "system", "content": out[0]["content"] + "\n\n" + tools.system}] + out[1:]
    return [{"role": "system", "content": tools.system}] + out


def written(i: int, call) -> dict:
    """An earlier tool call of the conversation (OpenAI's form) as the model writes one."""
    f = call.get("function") if isinstance(call, dict) else None
    try:
        return {"name": f["name"], "arguments": json.loads(f["arguments"])}
    except (TypeError, KeyError, ValueError):
        raise HotcoldError(f'messages[{i}].tool_calls: [{{"id", "type": "function", "function": {{"name", '
                           '"arguments": a JSON text}}}}, ...]') from None


def reply(text: str) -> tuple[str | None, list | None]:
    """The content and OpenAI's tool_calls of a reply under the tools' schema; the text as it is where it was cut
    short (by max_tokens or a stop string)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return text, None
    if "tool_calls" in obj:
        return None, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                       "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                      for c in obj["tool_calls"]]
    return obj["response"], None
