"""Tools: plain Python functions described to the model, and the model's calls to them.

- `tool_schema(fn)`: the OpenAI/HF function schema from the type hints and the docstring
  (`{"type": "function", "function": {"name", "description", "parameters"}}`); `ToolSpecError`
  for a parameter without a hint, no docstring, `*args`/`**kwargs` or a type JSON cannot say.
- `parse_tool_calls(text)`: the `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
  of a model turn (Hermes/Qwen format), each a `ToolCall` or a `BadToolCall` (an error text for the
  model).
- `check_arguments(schema, arguments)`: None, or what is wrong with a call's arguments.
- `plain_tool_block(schemas)`: the plain-text description used when the chat template has no
  tool format; `format_result(value)`: a tool's return value as text.
"""
from __future__ import annotations

import inspect
import json
import re
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
OPEN_TAG = "<tool_call>"

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}
_PY_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "object": (dict,),
             "array": (list,)}


class ToolSpecError(ValueError):
    """A function that cannot be a tool (checked before any model loads)."""


def _json_type(tp, fn_name: str, param: str) -> Dict[str, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _JSON_TYPES:
        return {"type": _JSON_TYPES[tp]}
    if origin is Union or (origin is not None and getattr(origin, "__name__", "") == "UnionType"):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _json_type(rest[0], fn_name, param)
        return {"anyOf": [_json_type(a, fn_name, param) for a in rest]}
    if origin in (list, List, tuple):
        out: Dict[str, Any] = {"type": "array"}
        if args and args[0] is not Ellipsis:
            out["items"] = _json_type(args[0], fn_name, param)
        return out
    if origin in (dict, Dict):
        return {"type": "object"}
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        out = {"enum": list(args)}
        if len(kinds) == 1 and next(iter(kinds)) in _JSON_TYPES:
            out["type"] = _JSON_TYPES[next(iter(kinds))]
        return out
    raise ToolSpecError(f"tool {fn_name}: parameter {param!r} has the type {tp!r}, which a JSON schema cannot "
                        "describe; use str, int, float, bool, list[...], dict, Optional[...] or Literal[...]")


_SECTIONS = ("args:", "arguments:", "parameters:", "returns:", "return:", "raises:", "yields:", "examples:",
             "example:", "note:", "notes:")


def _docstring_parts(doc: str) -> tuple:
    """(description, {param: description}) of a Google-style docstring: the description is the
    first paragraph; parameters are the `name (type): text` lines of its Args: section."""
    lines = inspect.cleandoc(doc).splitlines()
    head = []
    for line in lines:
        if not line.strip() or line.strip().lower() in _SECTIONS:
            break
        head.append(line.strip())
    params: Dict[str, str] = {}
    section, current, indent = None, None, 0  # indent: of the current parameter's line
    for line in lines:
        if line.strip().lower() in _SECTIONS:
            section, current = line.strip().lower(), None
            continue
        if section not in ("args:", "arguments:", "parameters:") or not line.strip():
            continue
        m = re.match(r"^\s{0,8}(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", line)
        if m and (current is None or len(line) - len(line.lstrip()) <= indent):
            current, indent = m.group(1), len(line) - len(line.lstrip())
            params[current] = m.group(3).strip()
        elif current is not None:
            params[current] = (params[current] + " " + line.strip()).strip()
    return " ".join(head), params


def tool_schema(fn, name: Optional[str] = None) -> Dict[str, Any]:
    """The function schema of `fn` (see the module docstring); ToolSpecError naming it when it has
    no docstring, a parameter without a type hint, or *args/**kwargs."""
    name = name or getattr(fn, "__name__", None) or type(fn).__name__
    doc = inspect.getdoc(fn)
    if not doc or not doc.strip():
        raise ToolSpecError(f"tool {name} has no docstring; the model learns what a tool does from it: write one "
                            "(and an Args: section describing each parameter)")
    try:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
    except (TypeError, ValueError, NameError) as e:
        raise ToolSpecError(f"tool {name}: its signature cannot be read ({e})") from None
    description, param_docs = _docstring_parts(doc)
    properties: Dict[str, Any] = {}
    required: List[str] = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ToolSpecError(f"tool {name}: *{p.name} / **{p.name} cannot be described to the model; name every "
                                "parameter")
        if p.name not in hints:
            raise ToolSpecError(f"tool {name}: parameter {p.name!r} has no type hint; annotate it (e.g. "
                                f"{p.name}: str) so the model knows what to pass")
        prop = _json_type(hints[p.name], name, p.name)
        if p.name in param_docs:
            prop["description"] = param_docs[p.name]
        properties[p.name] = prop
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    return {"type": "function", "function": {"name": name, "description": description or name,
                                             "parameters": {"type": "object", "properties": properties,
                                                            "required": required}}}


@dataclass
class ToolCall:
    name: str
    arguments: Dict[str, Any]


@dataclass
class BadToolCall:
    error: str   # answered to the model as the call's result


def parse_tool_calls(text: str) -> List[Union[ToolCall, BadToolCall]]:
    """Every `<tool_call>...</tool_call>` block of `text` in order; an opening tag without its
    closing tag (a turn cut by the token budget) is a BadToolCall too."""
    calls: List[Union[ToolCall, BadToolCall]] = []
    for m in TOOL_CALL.finditer(text):
        calls.append(_parse_one(m.group(1)))
    tail = text[text.rfind("</tool_call>") + len("</tool_call>"):] if "</tool_call>" in text else text
    if OPEN_TAG in tail:
        calls.append(BadToolCall("error: the tool call has no closing </tool_call> tag"))
    return calls


def _parse_one(body: str) -> Union[ToolCall, BadToolCall]:
    try:
        call = json.loads(body.strip())
    except json.JSONDecodeError as e:
        return BadToolCall(f"error: the tool call is not valid JSON ({e.msg} at character {e.pos}); write "
                           '{"name": "<tool>", "arguments": {...}}')
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return BadToolCall('error: a tool call is a JSON object {"name": "<tool>", "arguments": {...}}')
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        return BadToolCall(f"error: the arguments of {call['name']} must be a JSON object, got {json.dumps(args)}")
    return ToolCall(call["name"], args)


def check_arguments(schema: Dict[str, Any], arguments: Dict[str, Any]) -> Optional[str]:
    """None when `arguments` fit the schema's parameters (names, required ones, simple types),
    else the error text for the model."""
    fn = schema["function"]
    params = fn["parameters"]
    props, name = params["properties"], fn["name"]
    unknown = sorted(set(arguments) - set(props))
    if unknown:
        return f"error: {name} has no parameter {', '.join(map(repr, unknown))}; its parameters are {sorted(props)}"
    missing = [p for p in params["required"] if p not in arguments]
    if missing:
        return f"error: {name} needs the argument(s) {', '.join(map(repr, missing))}"
    for key, value in arguments.items():
        kind = props[key].get("type")
        ok = _PY_TYPES.get(kind)
        if ok is not None and value is not None and (not isinstance(value, ok) or
                                                     (kind in ("integer", "number") and isinstance(value, bool))):
            return f"error: argument {key!r} of {name} must be a {kind}, got {json.dumps(value)}"
    return None


def format_result(value: Any) -> str:
    """A tool's return value as the text the model reads."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


PLAIN_HEADER = ("You can call these tools. To call one, write <tool_call>{\"name\": \"<tool>\", \"arguments\": "
                "{...}}</tool_call>; its result comes back in <tool_response></tool_response>.")


def plain_tool_block(schemas: List[Dict[str, Any]]) -> str:
    """The documented plain-text tool description: a header line, then one line per tool,
    `- name(param: type, ...): description`."""
    lines = [PLAIN_HEADER]
    for s in schemas:
        fn = s["function"]
        params = ", ".join(f"{k}: {v.get('type', 'any')}" + ("" if k in fn["parameters"]["required"] else " = optional")
                           for k, v in fn["parameters"]["properties"].items())
        lines.append(f"- {fn['name']}({params}): {fn['description']}")
    return "\n".join(lines)
