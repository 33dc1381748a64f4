"""Llama 3 style chat templates, on a tokenizer trained here (no network): the assistant turn is closed by
<|eot_id|>, which is not the tokenizer's EOS (<|end_of_text|>); the template renders the BOS and the
tokenizer adds one by default. The closing token of each assistant turn is a target and a stop id of the
model; a document holds one BOS; ``generation_config.json``'s list of EOS ids is read and written."""

from __future__ import annotations

import json

import jax
import pytest

from hf_fixtures import TEXTS, byte_bpe

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import processors

    tok = byte_bpe(SPECIALS, 320, TEXTS + ["Add 3 and 4. The sum is 7. user assistant"])
    # add_bos: plain tokenization puts <|begin_of_text|> first, as Llama 3's tokenizer does
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                               eos_token="<|end_of_text|>", unk_token="<|end_of_text|>")
    out.chat_template = LLAMA3
    return out


def conversation() -> list[dict]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Add 3 and 4."}, {"role": "assistant", "content": "The sum is 7."},
            {"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "The sum is 3."}]


def test_eot_closes_supervised_turns_and_one_bos(tokenizer):
    from sft_jax.data.config import DataConfig
    from sft_jax.data.formats import Renderer, check_prompt_tokens, encode_documents, encode_prompt, turn_end_token_id

    bos, eot = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert tokenizer("Add")["input_ids"][0] == bos  # the tokenizer adds a BOS of its own by default
    assert eot != tokenizer.eos_token_id
    assert turn_end_token_id(tokenizer, LLAMA3) == eot

    messages = conversation()
    renderer = Renderer(tokenizer, LLAMA3)
    docs = encode_documents([messages], renderer, train_on_prompt=False, last_turn_only=False)
    tokens, supervised = docs.tokens[0], docs.supervised[0]
    assert tokens[0] == bos and tokens.count(bos) == 1  # the template's BOS, no second one
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokens == tokenizer(whole, add_special_tokens=False)["input_ids"]  # the rendering, token for token
    # supervised spans: exactly each assistant content followed by its <|eot_id|>
    spans, start = [], None
    for i, s in enumerate(supervised + [False]):
        if s and start is None:
            start = i
        elif not s and start is not None:
            spans.append(tokens[start:i])
            start = None
    assert [tokenizer.decode(span) for span in spans] == ["The sum is 7.<|eot_id|>", "The sum is 3.<|eot_id|>"]
    assert tokens.count(eot) == 5 and sum(supervised[i] for i, t in enumerate(tokens) if t == eot) == 2

    check_prompt_tokens([messages], docs, renderer)
    prompt = encode_prompt(tokenizer, DataConfig(format="chat", template=LLAMA3), messages)
    assert prompt == tokens[:docs.last_response_start[0]] and prompt.count(bos) == 1


def test_templates_without_a_closing_token_or_that_raise_are_refused(tokenizer):
    from sft_jax.data.config import DataError
    from sft_jax.data.formats import Renderer

    open_ended = LLAMA3.replace("'<|eot_id|>'", "'\\n'")
    with pytest.raises(DataError, match="lacks the eos token"):
        Renderer(tokenizer, open_ended).pieces(conversation())
    with pytest.raises(DataError, match="fails: no system turn"):  # the template's own refusal, as a DataError
        Renderer(tokenizer, "{{ raise_exception('no system turn') }}").pieces(conversation())


def test_run_stops_at_the_turn_end_and_export_lists_it(tmp_path, tokenizer):
    """A scratch Llama run with this tokenizer and template: the model config stops at <|eot_id|> as well
    as the EOS, the export's generation_config.json lists both, and reading the export back keeps both."""
    from sft_jax.config import ConfigError, from_dict
    from sft_jax.core.setup import model_and_tokenizer
    from sft_jax.models import hf_io
    from sft_jax.models.family import family_of, stop_token_ids

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    config = from_dict({"model": {"preset": "llama_tiny", "tokenizer": str(tmp_path / "tok"), "n_positions": 64},
                               "data": {"train": "unused.jsonl", "format": "chat", "template": "auto", "max_length": 64},
                               "train": {"steps": 1, "max_new_tokens": 8}})
    cfg, tok, _ = model_and_tokenizer(config)
    assert stop_token_ids(cfg) == (tokenizer.eos_token_id, eot)

    params = family_of(cfg).init_params(cfg, jax.random.key(0))
    hf_io.export_hf(params, cfg, tmp_path / "hf", tokenizer=tok, verify=False)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, eot]
    assert transformers.GenerationConfig.from_pretrained(str(tmp_path / "hf")).eos_token_id == [tokenizer.eos_token_id, eot]
    # config.json lists only the EOS: the generation config's ids are read too
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf_config["eos_token_id"] = tokenizer.eos_token_id
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config))
    assert stop_token_ids(hf_io.read_config(tmp_path / "hf")) == (tokenizer.eos_token_id, eot)

    # GPT-2's config stops at its one EOS: a template closing turns with another token is refused
    gpt2 = from_dict({"model": {"preset": "tiny", "tokenizer": str(tmp_path / "tok"), "n_positions": 64},
                             "data": {"train": "unused.jsonl", "format": "chat", "template": "auto", "max_length": 64},
                               "train": {"steps": 1, "max_new_tokens": 8}})
    with pytest.raises(ConfigError, match="stop at one id"):
        model_and_tokenizer(gpt2)


def test_llama_demo_export_chats_in_transformers(tmp_path):
    """The demo's model on the Llama architecture (random weights, the demo tokenizer and built-in template):
    the export loads with AutoModelForCausalLM, and apply_chat_template + generate answers with the tokens
    sft_jax's own greedy decoding gives."""
    import torch

    from sft_jax.config import from_dict
    from sft_jax.core.setup import model_and_tokenizer
    from sft_jax.inference.sampling import generate
    from sft_jax.models import hf_io
    from sft_jax.models.family import family_of, stop_token_ids

    config = from_dict({"model": {"preset": "llama_demo", "n_positions": 128}, "train": {"steps": 1}})
    cfg, tok, _ = model_and_tokenizer(config)
    params = family_of(cfg).init_params(cfg, jax.random.key(0))
    report = hf_io.export_hf(params, cfg, tmp_path / "hf", tokenizer=tok, chat_template=tok.chat_template)
    assert report.max_abs_diff["transformers"] <= hf_io.HF_ATOL

    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    messages = [{"role": "user", "content": "Reverse the letters.\n\nc a t"}]
    prompt = exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = exported(prompt, add_special_tokens=False)["input_ids"]
    ours = generate(params, cfg, [ids], max_new_tokens=6, eos_id=cfg.eos_token_id, stop_ids=stop_token_ids(cfg))[0]
    assert model.generation_config.eos_token_id == cfg.eos_token_id == exported.eos_token_id
    out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    assert out == ours
