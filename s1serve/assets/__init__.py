"""The published Intern-S1-Pro small files (tokenizer, chat template, configs), shipped unmodified as data."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent

# What a checkpoint folder needs besides config.json and the weights.
CHECKPOINT_SIDE_FILES = (
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
    "merges.txt",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "tokenizer_PROT.model",
    "tokenizer_SMILES.model",
    "tokenizer_XNA.model",
    "video_preprocessor_config.json",
    "vocab.json",
)
