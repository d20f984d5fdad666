"""The local transformers backend end to end, on a tiny random LLaVA built from configs.

The model's text is gibberish by construction: these tests check plumbing (loading through
`from_pretrained(dir)` exactly as users do, chat template, frames -> pixel values, batching,
left padding), storage rows and how unparseable output is handled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from data_engine.captioning.backends import LocalBackend
from data_engine.captioning.caption import CaptionConfig, Captioner
from data_engine.captioning.dsg import DSGChecker, DSGQuestionsConfig, DSGVerifyConfig
from data_engine.frames import ClipFrames
from data_engine.stages.base import StageError

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_tiny_llava(directory: Path) -> None:
    """A byte-level tokenizer, CLIP image processor and 1-layer CLIP + Llama LLaVA, saved the way
    a real checkpoint directory is (config, weights, tokenizer, processor, chat template)."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<s>", "</s>", "<pad>", "<image>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    # "full" keeps CLIP's class token, hence one extra image token per image.
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8, projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
        ),
        image_token_id=vocab["<image>"], vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llava")
    build_tiny_llava(directory)
    return directory


def clip(seed: int, k: int = 4) -> ClipFrames:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 255, (k, 40, 56, 3), dtype=np.uint8)
    return ClipFrames(frames, np.arange(k) * 0.25, np.zeros((0, 40, 56, 3), np.uint8), np.zeros(k))


def local_caption(tiny_vlm: Path, **kw) -> CaptionConfig:
    return CaptionConfig(
        backend="local", model_path=str(tiny_vlm), device="cpu", frames_per_clip=2,
        max_tokens=6, **kw,
    )  # fmt: skip


def test_missing_model_dir_names_the_config_key(tmp_path):
    """A wrong path must fail at stage start with the config key, not deep in transformers."""
    missing = tmp_path / "nope"
    with pytest.raises(StageError, match=rf"caption\.model_path: directory not found: {missing}"):
        Captioner(CaptionConfig(backend="local", model_path=str(missing)))


def test_local_captions_batched_equal_unbatched(tiny_vlm):
    """Batched generation must give each clip the same caption as generating it alone: a wrong
    padding side or image/prompt misalignment in a batch would change the text."""
    clips = [clip(0), clip(1, k=3), clip(2)]
    batched = Captioner(local_caption(tiny_vlm, batch_size=3)).score_clips(clips)
    single = Captioner(local_caption(tiny_vlm, batch_size=1)).score_clips(clips)
    assert [r.get("caption") for r in batched] == [r.get("caption") for r in single]
    assert all(isinstance(r["caption"], str) and r["caption"] for r in batched)
    table = pa.Table.from_pylist(batched, schema=Captioner.output_schema)
    assert table["caption_backend"].to_pylist() == ["local"] * 3
    assert table["caption_model"].to_pylist() == [tiny_vlm.name] * 3
    assert all(t > 0 for t in table["caption_time_s"].to_pylist())


def test_local_dsg_gibberish_fails_cleanly_and_shares_the_model(tiny_vlm):
    """A model whose output is not schema JSON must yield failed clips with the reason and no
    claims, never invented metrics; two sections naming one directory load it once."""
    questions = DSGQuestionsConfig(
        backend="local", model_path=str(tiny_vlm), device="cpu", max_tokens=8, parse_attempts=2
    )
    verify = DSGVerifyConfig(backend="local", model_path=str(tiny_vlm), device="cpu")
    stage = DSGChecker(questions, verify)
    assert stage.verify_backend is stage.question_backend
    assert isinstance(stage.question_backend, LocalBackend)
    metrics, claims = stage.check_clips([clip(0), clip(1)], ["A dog runs.", "A cat."], ["a", "b"])
    assert claims == []
    assert [m["dsg_status"] for m in metrics] == ["failed", "failed"]
    assert all("no valid question list after 2 attempts" in m["dsg_error"] for m in metrics)
    pa.Table.from_pylist(metrics, schema=DSGChecker.output_schema)


def test_local_verifier_gibberish_is_unreadable_not_a_no(tiny_vlm):
    """Per-frame verification through the local model (one image per request, batched): its
    gibberish answers are not yes/no, so the clip fails instead of counting hallucinations."""
    from data_engine.captioning.dsg import QUESTIONS_EXAMPLE
    from tests.helpers.chat_server import Reply, ScriptedChatServer

    with ScriptedChatServer(responder=lambda body: Reply(content=QUESTIONS_EXAMPLE)) as srv:
        stage = DSGChecker(
            DSGQuestionsConfig(base_url=srv.base_url, model="llm"),
            DSGVerifyConfig(backend="local", model_path=str(tiny_vlm), device="cpu", batch_size=4),
        )
        metrics, claims = stage.check_clips([clip(3)], ["A smiling woman."], ["a"])
        stage.close()
    assert claims == [] and metrics[0]["dsg_status"] == "failed"
    assert "dsg_verify: question 1 ('Is there a woman?'): not yes/no" in metrics[0]["dsg_error"]
