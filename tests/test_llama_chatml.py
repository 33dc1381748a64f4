"""SFT with the tokenizer's own ChatML template (``data.template: auto``) through the command line,
on a tiny Qwen2 model and a tokenizer trained here with <|im_start|> and <|im_end|>: the run
trains with that template, the export renders the trained prompt tokens, <|im_end|> closing each
assistant turn is a supervised target, and the export's generation stops at it."""

from __future__ import annotations

import json

import pytest
import yaml

from hf_fixtures import TEXTS, byte_bpe
from train_fixtures import train_cli, write_tiny_yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def chatml_tokenizer():
    tok = byte_bpe(SPECIALS, 320, TEXTS + ["Add 3 and 4. The sum is 7. user assistant"])
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                               pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    out.chat_template = CHATML
    return out


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Add {i} and {i + 1}."},
            {"role": "assistant", "content": f"The sum is {2 * i + 1}."}]


def test_chatml_sft_through_the_cli(tmp_path):
    from sft_jax.data.formats import Renderer, encode_documents

    tokenizer = chatml_tokenizer()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    conf = transformers.AutoConfig.for_model(
        model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=im_end)
    torch.manual_seed(0)
    src = tmp_path / "qwen"
    transformers.AutoModelForCausalLM.from_config(conf).save_pretrained(str(src))
    tokenizer.save_pretrained(str(src))
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": conversation(i)}) + "\n" for i in range(40)))

    run = tmp_path / "run"
    config = write_tiny_yaml(tmp_path / "run.yaml", run, f"model.init_from={src}", f"data.train={data}",
                             "data.format=chat", "data.template=auto", "data.eval_fraction=0", "train.steps=2",
                             "run.export=true", "model.dtype=float32")
    done = train_cli(["--config", config], devices=None)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    # the run trained with the tokenizer's own template (auto made concrete in its config)
    trained_template = yaml.safe_load((run / "config.yaml").read_text())["data"]["template"]
    assert trained_template == CHATML
    exported = transformers.AutoTokenizer.from_pretrained(str(run / "hf"))
    assert exported.chat_template == CHATML
    messages = conversation(3)
    docs = encode_documents([messages], Renderer(exported, trained_template), train_on_prompt=False,
                            last_turn_only=False)
    tokens, supervised, start = docs.tokens[0], docs.supervised[0], docs.last_response_start[0]
    prompt = exported.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True)
    prompt = list(prompt) if isinstance(prompt, list) else list(prompt["input_ids"])  # a BatchEncoding in newer versions
    assert tokens[:start] == prompt  # the export's generation prompt is exactly the trained prompt
    assert not any(supervised[:start])
    closing = max(i for i, s in enumerate(supervised) if s)
    assert tokens[closing] == im_end  # <|im_end|> closing the assistant turn is a target
    assert tokens.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2  # no doubled markers or BOS

    generation = transformers.GenerationConfig.from_pretrained(str(run / "hf"))
    assert im_end in (generation.eos_token_id if isinstance(generation.eos_token_id, list)
                      else [generation.eos_token_id])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(run / "hf"), dtype=torch.float32).eval()
    # <|im_end|> made the likeliest token (a logit bias): generate, with the export's own generation
    # config, must stop right after it rather than run to max_new_tokens
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                         sequence_bias={(im_end,): 100.0})
    assert out[0, len(prompt):].tolist() == [im_end]
