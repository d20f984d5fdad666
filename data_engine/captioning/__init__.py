"""Captioning and DSG-Video hallucination checks (STIV, data engine).

`Captioner` captions clips; `DSGChecker` checks captions claim by claim; `dsg_report` turns the
stored per-clip results into DSG-Video_i and DSG-Video_s. Both stages talk to a model through a
`ChatBackend`: an OpenAI-compatible server (vLLM, SGLang) or a local transformers directory.
"""

from data_engine.captioning.backends import (
    BackendConfig,
    ChatBackend,
    ChatReply,
    ChatRequest,
    LocalBackend,
    OpenAIBackend,
    make_backend,
)
from data_engine.captioning.caption import CaptionConfig, Captioner
from data_engine.captioning.dsg import (
    DSGChecker,
    DSGQuestionsConfig,
    DSGVerifyConfig,
    InvalidQuestions,
    parse_questions,
)
from data_engine.captioning.report import dsg_report

__all__ = [
    "BackendConfig",
    "CaptionConfig",
    "Captioner",
    "ChatBackend",
    "ChatReply",
    "ChatRequest",
    "DSGChecker",
    "DSGQuestionsConfig",
    "DSGVerifyConfig",
    "InvalidQuestions",
    "LocalBackend",
    "OpenAIBackend",
    "dsg_report",
    "make_backend",
    "parse_questions",
]
