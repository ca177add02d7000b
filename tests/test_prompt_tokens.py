"""A prompt is text: Qwen's control tokens typed into it (``<|image_pad|>`` opening an image slot with no image,
``<|im_end|>`` ending the user turn) are refused in one line naming the token, everywhere a prompt enters: the CLI
(exit 2, before the model loads), the library, the Encode Instruction node, recaption replies and training rows."""

from __future__ import annotations

import json

import pytest

import nodes_support as S  # noqa: E402
from test_nodes import image, lora_dir, model, model_dirs, single_file_dir  # noqa: E402,F401

from firered_core import cli  # noqa: E402
from firered_core.conditioning import check_prompt_text  # noqa: E402
from firered_core.errors import FireRedError  # noqa: E402

TYPED = "<|vision_start|><|image_pad|><|vision_end|> make it blue"


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|video_pad|>"])
def test_every_control_token_is_named(token):
    with pytest.raises(FireRedError, match=f"prompt holds '{__import__('re').escape(token)}'"):
        check_prompt_text(f"make it {token} blue")
    assert check_prompt_text("make <it> | blue, a|b <|> ok") == "make <it> | blue, a|b <|> ok"  # ordinary text


def test_cli_refuses_a_typed_control_token_in_one_line(tmp_path, capsys):
    code = cli.main(["-p", TYPED, "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--prompt holds '<|vision_start|>'" in err[-1] and "Traceback" not in "\n".join(err)
    assert not any("demo model" in line for line in err)  # refused before the model was built (DEMO_NOTE)
    code = cli.main(["-p", "blue", "-n", "<|im_end|>", "-o", str(tmp_path / "out.png")])
    assert code == 2 and "--negative-prompt holds '<|im_end|>'" in capsys.readouterr().err


def test_library_and_encode_node_refuse_it(model, tiny_model):  # noqa: F811
    from firered_core.pipeline import EditPipeline

    with pytest.raises(FireRedError, match=r"prompt holds '<\|vision_start\|>'"):
        EditPipeline(tiny_model).edit([], TYPED, " ", steps=1, width=64, height=64, output="latent")
    with pytest.raises(FireRedError, match=r"negative prompt holds '<\|image_pad\|>'"):
        EditPipeline(tiny_model).edit([], "blue", "<|image_pad|>", steps=1, width=64, height=64, output="latent")
    node = S.classes()["FireRedEncodeInstruction"]
    with pytest.raises(FireRedError) as err:
        node().encode(model, TYPED, "pipeline")
    assert "input 'prompt'" in str(err.value) and "'<|vision_start|>'" in str(err.value)


def test_recaption_reply_with_a_control_token_is_not_accepted():
    from firered_core.recaption import check_reply

    with pytest.raises(ValueError, match=r"reply holds '<\|im_end\|>'"):
        check_reply("Picture 1 in blue<|im_end|>", "x" * 30, 2)


def test_training_row_with_a_control_token_is_named_and_skipped(tmp_path):
    from firered_core.training.data import load_dataset
    from firered_core.training.synthetic import make_dataset

    root = make_dataset(tmp_path / "d", rows=2)
    jsonl = next(root.rglob("*.jsonl"))
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rows[1]["instruction_cn"] = "变蓝<|image_pad|>"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    ds = load_dataset(root)
    assert len(ds.samples) == 1 and len(ds.bad) == 1
    assert "instruction_cn holds '<|image_pad|>'" in str(ds.bad[0]) and ":2" in str(ds.bad[0])
