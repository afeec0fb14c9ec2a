"""Learned token embeddings (dreampainter_core.tokens): GLM and its tokenizer stay as loaded."""

import pytest
import torch

from dreampainter_core.errors import InputError, WeightFormatError
from dreampainter_core.loading import load_text_encoder, load_tokenizer
from dreampainter_core.pipeline import encode_prompt, text_hidden_states
from dreampainter_core.tokens import (init_token, load_learned_token, save_learned_token, text_encoder_identity,
                                      tokenizer_with)


@pytest.fixture(scope="module")
def text(tiny_model_dir):
    return load_tokenizer(tiny_model_dir / "tokenizer"), load_text_encoder(tiny_model_dir / "text_encoder")


def _encode(text, prompts, tokens=()):
    tokenizer, encoder = text
    return encode_prompt(tokenizer, encoder, prompts, dtype=torch.float32, device="cpu", tokens=tokens)


def test_a_token_with_a_words_embedding_encodes_as_that_word_and_prompts_without_it_are_unchanged(text):
    tokenizer, encoder = text
    token = init_token(tokenizer, encoder, "sks", init_word="cup")
    vocab_before = len(tokenizer)
    assert torch.equal(_encode(text, ["a sks on a table"], [token]), _encode(text, ["a cup on a table"]))
    assert torch.equal(_encode(text, ["a red cup"], [token]), _encode(text, ["a red cup"]))
    # Whole words only, and the shared tokenizer is not changed.
    assert torch.equal(_encode(text, ["tasks"], [token]), _encode(text, ["tasks"]))
    assert len(tokenizer) == vocab_before and "sks" not in tokenizer.get_vocab()
    assert tokenizer_with(tokenizer, ["sks"])[0] is tokenizer_with(tokenizer, ["sks"])[0]  # copied once


def test_the_embedding_gets_gradients_and_glm_none(text):
    tokenizer, encoder = text
    token = init_token(tokenizer, encoder, "<v>", seed=3)
    token.embedding = torch.nn.Parameter(token.embedding)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    text_hidden_states(tokenizer, encoder, ["a <v> cup"], tokens=[token]).square().mean().backward()
    assert token.embedding.grad is not None and token.embedding.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    moved = _encode(text, ["a <v> cup"], [token])
    with torch.no_grad():
        token.embedding += 1.0
    assert (_encode(text, ["a <v> cup"], [token]) - moved).abs().max() > 1e-4


def test_token_file_round_trips_and_refuses_another_text_encoder(text, tmp_path, tiny_model_dir):
    tokenizer, encoder = text
    token = init_token(tokenizer, encoder, "<background>", init_word="background", base_model="tiny")
    path = save_learned_token(token, tmp_path / "bg.safetensors", {"trained_steps": 3})
    loaded = load_learned_token(path)
    assert (loaded.token, loaded.init, loaded.base_model) == ("<background>", "word:background", "tiny")
    assert loaded.text_encoder == text_encoder_identity(encoder) and torch.equal(loaded.embedding, token.embedding)
    loaded.check_fits(encoder)
    other = load_text_encoder(tiny_model_dir / "text_encoder")
    with torch.no_grad():
        other.get_input_embeddings().weight[0] += 1.0
    with pytest.raises(WeightFormatError, match="another text encoder"):
        _encode((tokenizer, other), ["a <background>"], [loaded])
    with pytest.raises(WeightFormatError, match="not a learned-token file"):
        load_learned_token(tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(InputError, match="one word"):
        init_token(tokenizer, encoder, "two words")


def test_in_a_byte_level_bpe_too_a_token_starts_as_its_word_reads_inside_a_prompt():
    """GLM-4's tokenizer is a byte-level BPE: "background" after a space is another piece (" background")
    than at the start of a text. The token takes the space before it and starts from the in-sentence
    piece, so "a red cup <background>" at initialisation encodes exactly as "a red cup background"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GlmConfig, GlmModel, PreTrainedTokenizerFast

    from train.tiny import tiny_text_encoder_config

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["a red cup background on a table", "background", "a blue background wall"] * 50,
                            trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", padding_side="left")
    assert tokenizer("background").input_ids != tokenizer("a background").input_ids[1:]  # two pieces for one word
    encoder = GlmModel(GlmConfig(**tiny_text_encoder_config(len(tokenizer), tokenizer.pad_token_id))).eval()
    token = init_token(tokenizer, encoder, "<background>", init_word="background")
    assert torch.equal(_encode((tokenizer, encoder), ["a red cup <background>"], [token]),
                       _encode((tokenizer, encoder), ["a red cup background"]))
