"""The HTTP API's smaller routes: llama.cpp's ``POST /tokenize`` and ``POST /detokenize``, OpenAI's
``GET /v1/models/{id}``, and OpenAI-shaped bodies for unknown routes (404) and methods (405)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from jserve.http_schemas import ApiError, _Body

if TYPE_CHECKING:
    from jserve.http_api import HttpFrontEnd

MAX_TOKENIZE_IDS = 1 << 20


class TokenizeRequest(_Body):
    """llama.cpp's body: ``add_special`` adds the model's BOS (when it uses one); special tokens
    written in ``content`` are parsed as such (llama.cpp's ``parse_special``)."""

    content: str
    add_special: bool = False
    with_pieces: bool = False
    model: str | None = None  # accepted for clients that always send it


class DetokenizeRequest(_Body):
    tokens: list[int] = Field(max_length=MAX_TOKENIZE_IDS)
    model: str | None = None


def _piece(tok: Any, token: int) -> str | list[int]:
    """A token's text as llama.cpp gives it: a string when its bytes are UTF-8, else the bytes."""
    raw = tok.token_bytes(token, skip_special=False)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def add_routes(front: HttpFrontEnd, app: FastAPI) -> None:
    """Add the routes above to ``front``'s app."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            err = ApiError(404, f"no route {_request.method} {_request.url.path} on this server", code="not_found",
                           refusal=False)
        elif e.status_code == 405:
            err = ApiError(405, f"{_request.url.path} does not accept {_request.method}", code="method_not_allowed",
                           refusal=False)
        else:
            err = ApiError(e.status_code, str(e.detail), refusal=False)
        return JSONResponse(err.body(), status_code=err.status, headers=getattr(e, "headers", None))

    def tokenizer():
        llm = front._ready()
        if llm.tokenizer is None:
            raise ApiError(400, "this checkpoint has no tokenizer")
        return llm, llm.tokenizer

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        llm, tok = tokenizer()
        if body.content:
            llm._check_text_fits(body.content, "content")
        ids = tok.tok.encode(body.content, add_special_tokens=False).ids
        if body.add_special and tok.cfg.bos_token_id is not None and tok.cfg.add_bos_token:
            ids = [tok.cfg.bos_token_id, *ids]
        if body.with_pieces:
            return {"tokens": [{"id": i, "piece": _piece(tok, i)} for i in ids]}
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        llm, tok = tokenizer()
        vocab = llm.config.vocab_size
        for i, t in enumerate(body.tokens):
            if not 0 <= t < vocab:
                raise ApiError(400, f"token id {t} at index {i} is outside the vocabulary [0, {vocab})",
                               param="tokens")
        return {"content": tok.decode(body.tokens, skip_special=False)}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        llm = front._ready()
        front._check_model(model_id)
        return {"id": front.model_id, "object": "model", "created": 0, "owned_by": "jserve",
                "max_model_len": llm.engine.max_len}
