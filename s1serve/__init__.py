"""s1serve: serving Intern-S1-Pro. The offline API is `LLM` + `SamplingParams`."""

from s1serve.llm import LLM, RequestOutput
from s1serve.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
