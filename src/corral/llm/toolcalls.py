"""Tool calls assembled from a streamed chat completion, whatever the server's dialect.

OpenAI-compatible servers stream ``delta.tool_calls`` differently:

* llama.cpp and vLLM send ``id``, ``type`` and ``function.name`` in a call's first chunk and
  ``function.arguments`` in fragments that carry only the call's ``index``;
* Ollama sends each call whole in one chunk, and some versions give every call ``index`` 0
  (older ones no ``index`` at all);
* some templates give empty ids, and vLLM's Qwen3 parsers have sent argument fragments under an
  entry with neither id nor name.

:class:`ToolCallAssembler` takes the fragments in order and yields the calls: a fragment that
names a new id, or a function name for a call that already has one, starts a new call; one
without either continues the call at its index (else the last call). Calls without an id get
a stable one (``call_<n>``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class ToolCall:
    """One call the model asked for: ``arguments`` is the JSON text exactly as it came."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


class ToolCallAssembler:
    """Feed ``delta.tool_calls`` lists in stream order; read :attr:`calls` at the end."""

    __slots__ = ("_by_index", "_calls", "_id_prefix")

    def __init__(self, id_prefix: str = "call") -> None:
        self._calls: list[_Partial] = []
        self._by_index: dict[int, _Partial] = {}
        self._id_prefix = id_prefix

    def feed(self, fragments: object) -> None:
        if not isinstance(fragments, list):
            return
        for fragment in fragments:
            if isinstance(fragment, dict):
                self._fragment(fragment)

    def _fragment(self, fragment: dict[str, Any]) -> None:
        function = fragment.get("function")
        function = function if isinstance(function, dict) else {}
        call_id = fragment.get("id") or ""
        name = function.get("name") or ""
        arguments = function.get("arguments")
        index = fragment.get("index")
        index = index if isinstance(index, int) and not isinstance(index, bool) else None
        current = self._by_index.get(index) if index is not None else None
        if current is None and index is None and self._calls and not (call_id or name):
            current = self._calls[-1]  # a bare fragment continues the last call
        starts_new = current is None or (
            (call_id and current.id and call_id != current.id) or (name and current.name))
        if starts_new:
            current = _Partial()
            self._calls.append(current)
            if index is not None:
                self._by_index[index] = current
        assert current is not None
        if call_id and not current.id:
            current.id = str(call_id)
        if name:
            current.name = str(name)
        if isinstance(arguments, str):
            current.arguments.append(arguments)
        elif isinstance(arguments, dict):  # a server that sends the object itself
            current.arguments.append(json.dumps(arguments))

    @property
    def calls(self) -> list[ToolCall]:
        out = []
        for n, call in enumerate(self._calls, start=1):
            if not call.name and not call.arguments:
                continue
            out.append(ToolCall(call.id or f"{self._id_prefix}_{n}", call.name,
                                "".join(call.arguments)))
        return out


class _Partial:
    __slots__ = ("arguments", "id", "name")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments: list[str] = []
