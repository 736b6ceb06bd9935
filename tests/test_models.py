"""Model loading (presets, local paths in the hub layout) and parameter accounting."""

import pytest
import torch
from transformers import AutoModelForCTC, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining

from pinch_ray.core import gates, models
from pinch_ray.config import GateConfig
from pinch_ray.core.models import CHAR_VOCAB, count_parameters, load_model, make_processor, tiny_config


@pytest.mark.parametrize("preset,cls", [("tiny", "Wav2Vec2ForCTC"), ("tiny-hubert", "HubertForCTC"),
                                        ("tiny-wavlm", "WavLMForCTC")])
def test_presets_build_small_ctc_models(preset, cls):
    model, processor = load_model(preset)
    assert type(model).__name__ == cls
    assert 0.7e6 < count_parameters(model).total < 1.0e6
    assert model.config.vocab_size == len(CHAR_VOCAB) == len(processor.tokenizer)
    assert processor.tokenizer.pad_token_id == model.config.pad_token_id == 0
    # 50 Hz frames: one second of audio gives 49-50 frames
    with torch.no_grad():
        frames = model(torch.zeros(1, 16_000)).logits.shape[1]
    assert 48 <= frames <= 50


def test_processor_round_trips_text():
    processor = make_processor()
    ids = processor.tokenizer("IT'S A TEST").input_ids
    assert processor.tokenizer.decode(ids) == "IT'S A TEST"
    assert CHAR_VOCAB["|"] in ids


def test_load_fine_tuned_model_from_local_path(tmp_path):
    model, processor = load_model("tiny", mask_time_prob=0.0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_model(str(tmp_path))
    assert loaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    x = torch.randn(1, 8000)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).logits, model.eval()(x).logits)


def test_load_pretrained_ssl_checkpoint_gets_char_vocab_and_fresh_head(tmp_path):
    """The paper's one-pass setting: a pre-trained (not fine-tuned) checkpoint without tokenizer."""
    config = tiny_config("tiny", vocab_size=None)
    ssl = Wav2Vec2ForPreTraining(config)
    ssl.save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(return_attention_mask=False, do_normalize=True).save_pretrained(tmp_path)

    model, processor = load_model(str(tmp_path), layerdrop=0.0)
    assert type(model).__name__ == "Wav2Vec2ForCTC"
    assert model.config.vocab_size == len(CHAR_VOCAB) and model.lm_head.out_features == len(CHAR_VOCAB)
    assert processor.tokenizer.get_vocab() == CHAR_VOCAB
    assert processor.feature_extractor.return_attention_mask is False  # the checkpoint's own
    torch.testing.assert_close(model.wav2vec2.encoder.layers[0].attention.q_proj.weight,
                               ssl.wav2vec2.encoder.layers[0].attention.q_proj.weight)


def test_a_half_precision_checkpoint_loads_as_float32_master_weights(tmp_path):
    """transformers keeps a checkpoint's own dtype ("auto"): an fp16 checkpoint would train in fp16
    under AdamW with no loss scaling. autocast gives the bf16 compute; the weights stay float32."""
    model, processor = load_model("tiny", mask_time_prob=0.0)
    model.half().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight.float())  # the values kept


def test_the_seed_draws_the_fresh_ctc_head_of_a_checkpoint_without_one(tmp_path):
    """training.seed is what sweep.seeds varies: on a pre-trained checkpoint it must reach the new
    head, whatever the random state before loading."""
    Wav2Vec2ForPreTraining(tiny_config("tiny", vocab_size=None)).save_pretrained(tmp_path)
    heads = {}
    for seed, noise in ((0, 1), (0, 2), (1, 1)):
        torch.manual_seed(noise)  # what ran before the load must not matter
        model, _ = load_model(str(tmp_path), seed=seed)
        heads[seed, noise] = model.lm_head.weight.detach().clone()
    torch.testing.assert_close(heads[0, 1], heads[0, 2])
    assert not torch.equal(heads[0, 1], heads[1, 1])


def test_load_rejects_a_non_ctc_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match=r"(?s)AutoModelForCTC cannot build a CTC model from this checkpoint "
                                         r"\(Unrecognized configuration class .*BertConfig.*\); point init_from at a "
                                         r"wav2vec2/HuBERT/WavLM checkpoint"):
        load_model(str(tmp_path))


def test_a_checkpoint_that_is_not_there_fails_first_with_its_own_error(tmp_path, monkeypatch, caplog):
    # it used to log "has no tokenizer: using the 32-character vocabulary" and then fail on the hub's
    # repo-id syntax, which sent users looking at their vocabulary
    monkeypatch.chdir(tmp_path)
    for build in (load_model, models.model_skeleton):
        with caplog.at_level("INFO", logger="pinch_ray.core.models"), \
                pytest.raises(OSError, match=r"'runs/missing/model' is no directory under .* and no model on the"):
            build("runs/missing/model")
        assert "tokenizer" not in caplog.text


def test_parameter_counts_measure_hard_masks():
    model, _ = load_model("tiny")
    dense = count_parameters(model)
    assert dense.gated == 0 and dense.nonzero == dense.total and dense.reduction == 0
    gates.attach_uniform_masks(model, GateConfig(), 0.5)
    counts = count_parameters(model)
    pruned = sum(l.pruned for l in gates.layer_sparsity(model))
    assert counts.total == dense.total
    assert counts.gated == sum(l.numel for l in gates.layer_sparsity(model))
    assert counts.nonzero == dense.total - pruned
    assert counts.reduction == pytest.approx(pruned / dense.total)
    assert 0.4 < counts.reduction < 0.5  # gated weights are most, not all, of the model
    gates.fold(model)
    assert count_parameters(model).nonzero == counts.nonzero


def test_saved_folded_model_loads_with_stock_auto_class(tmp_path):
    model, processor = load_model("tiny-hubert")
    gates.attach_gates(model, GateConfig(threshold_init=1.0))
    gates.fold(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCTC.from_pretrained(tmp_path)
    assert count_parameters(reloaded).nonzero == count_parameters(model).nonzero


def test_a_local_checkpoint_is_passed_to_the_workers_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "model").mkdir(parents=True)
    assert models.portable_init_from("runs/model") == str(tmp_path / "runs" / "model")
    assert models.portable_init_from(str(tmp_path / "runs" / "model")) == str(tmp_path / "runs" / "model")
    (tmp_path / "tiny").mkdir()  # a preset or a shipped foundation is a name, whatever lies here
    for name in ("tiny", models.DEFAULT_FOUNDATION, "facebook/wav2vec2-base", "runs/missing"):
        assert models.portable_init_from(name) == name
