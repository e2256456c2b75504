"""s1serve: serving Intern-S1-Pro. The offline API is `LLM` + `SamplingParams`.

They are imported on first use, so that processes which never touch the model (the proxy, the CLI's help) do
not pay for importing torch.
"""

from typing import Any

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "RequestOutput"):
        from s1serve.entrypoints import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from s1serve.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 's1serve' has no attribute {name!r}")
