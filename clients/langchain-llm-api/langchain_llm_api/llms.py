"""`LLMAPI`: a LangChain text-completion LLM over `/generate` and `/agenerate`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import GenerationChunk
from pydantic import ConfigDict, Field

from langchain_llm_api._connection import Connection

SAMPLING_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                   "presence_penalty", "frequency_penalty", "seed")


class LLMAPI(Connection, LLM):
    """Text completion by an llm-api server.

    `invoke` posts to `/generate`; `stream`/`astream` (and `invoke` with `streaming=True`)
    read `/agenerate`'s server-sent events, handing every piece to the callback handlers.
    Unset sampling fields are not sent, so the server's defaults apply; `stop` is sent only
    when given (here or per call).

    ```python
    from langchain_llm_api import LLMAPI

    llm = LLMAPI(base_url="http://localhost:8000", max_tokens=64, temperature=0)
    print(llm.invoke("The capital of France is"))
    ```
    """

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())

    model: str | None = None
    """Served model name; None = the server's first model."""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0)
    stop: list[str] | None = None
    """Stop sequences sent with every call (a call's own `stop` replaces them)."""
    streaming: bool = False
    """`invoke` reads the stream too, so callbacks see every token."""

    @property
    def _llm_type(self) -> str:
        return "llm-api"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "model": self.model, **self._params(None, {})}

    def _params(self, stop: list[str] | None, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(overrides) - {*SAMPLING_PARAMS, "model"})
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; "
                             f"allowed: model, stop, {', '.join(SAMPLING_PARAMS)}")
        params = {name: getattr(self, name) for name in SAMPLING_PARAMS}
        params.update({k: v for k, v in overrides.items() if k != "model"})
        stops = stop if stop is not None else self.stop
        if stops:
            params["stop"] = list(stops)
        return {k: v for k, v in params.items() if v is not None}

    def _body(self, prompt: str, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt}
        params = self._params(stop, kwargs)
        if params:
            body["params"] = params
        model = kwargs.get("model", self.model)
        if model is not None:
            body["model"] = model
        return body

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        if self.streaming:
            return "".join(c.text for c in self._stream(prompt, stop, run_manager, **kwargs))
        text = self._post("/generate", self._body(prompt, stop, kwargs))
        return _as_text(text)

    async def _acall(self, prompt: str, stop: list[str] | None = None,
                     run_manager: AsyncCallbackManagerForLLMRun | None = None,
                     **kwargs: Any) -> str:
        if self.streaming:
            pieces = [c.text async for c in self._astream(prompt, stop, run_manager, **kwargs)]
            return "".join(pieces)
        text = await self._apost("/generate", self._body(prompt, stop, kwargs))
        return _as_text(text)

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[GenerationChunk]:
        for event in self._events("/agenerate", self._body(prompt, stop, kwargs)):
            if event.event != "message":
                continue
            chunk = GenerationChunk(text=event.data)
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        async for event in self._aevents("/agenerate", self._body(prompt, stop, kwargs)):
            if event.event != "message":
                continue
            chunk = GenerationChunk(text=event.data)
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def _as_text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"/generate answered {type(value).__name__}, expected a JSON string")
    return value
