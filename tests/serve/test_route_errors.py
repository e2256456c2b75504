"""An exception no handler takes (our own bug) is a JSON 500 in the route's error shape, and it stops there:
Starlette's own handler for Exception re-raises after answering, which makes uvicorn drop the keep-alive
connection (the test client re-raises it instead)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from s1serve.serve.route_errors import install_error_handling


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handling(app)

    @app.post("/v1/chat/completions")
    async def chat() -> None:
        raise RuntimeError("a bug in chat")

    @app.post("/v1/messages")
    async def messages() -> None:
        raise KeyError("a bug in messages")

    return app


def test_a_bug_is_a_json_500_in_the_openai_shape_and_is_not_re_raised() -> None:
    client = TestClient(_app(), raise_server_exceptions=True)
    r = client.post("/v1/chat/completions")
    assert r.status_code == 500
    assert r.json()["error"] == {"message": "internal error (RuntimeError): a bug in chat",
                                 "type": "internal_server_error", "param": None, "code": 500}


def test_a_bug_on_the_messages_route_is_a_500_in_anthropic_shape() -> None:
    r = TestClient(_app(), raise_server_exceptions=True).post("/v1/messages")
    assert r.status_code == 500
    assert r.json() == {"type": "error", "error": {"type": "api_error", "message": "internal error (KeyError): 'a bug in messages'"}}


def test_a_wrong_method_names_the_method_and_the_allowed_one() -> None:
    r = TestClient(_app()).get("/v1/messages")
    assert r.status_code == 405
    assert r.json()["error"]["message"] == "method GET is not allowed on /v1/messages; use POST"
