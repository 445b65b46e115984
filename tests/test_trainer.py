"""cpeft models under transformers.Trainer with its default arguments: the forward signature is
visible (Trainer keeps the columns the model takes), checkpoints and the final save hold only the
adapter in peft's layout, resume_from_checkpoint continues the same run, and the saved adapter
loads in peft with equal outputs. Tiny models built from configs, a few steps each."""

import os
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

import cpeft  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        yield


class Rows(torch.utils.data.Dataset):
    """A list of feature dicts; ``note`` is a column no model takes, which Trainer must drop."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def classification_data(n=16):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (n, 8), generator=generator)
    return Rows(
        [
            {
                "input_ids": ids[i],
                "attention_mask": torch.ones(8, dtype=torch.long),
                "label": int(ids[i, 0] % 3),
                "note": i,
            }
            for i in range(n)
        ]
    )


def lm_data(n=16):
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 100, (n, 8), generator=generator)
    return Rows([{"input_ids": ids[i], "labels": ids[i], "note": i} for i in range(n)])


def bert_classifier():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config)
    return (
        model,
        cpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
        classification_data,
    )


def gpt2_lm():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config)
    return (
        model,
        cpeft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM"
        ),
        lm_data,
    )


def make_peft_model(case):
    base, config, data = case()
    return cpeft.get_peft_model(base, config), data


def trainer_for(model, data, output_dir, max_steps=4):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=7,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=data())


def adapter_tensors(model):
    return {k: v.clone() for k, v in cpeft.get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize("case", [bert_classifier, gpt2_lm], ids=["bert-seq-cls", "gpt2-causal-lm"])
def test_trainer_trains_saves_adapter_only_resumes_and_reloads_in_peft(case, tmp_path):
    model, data = make_peft_model(case)
    initial = adapter_tensors(model)
    trainer = trainer_for(model, data, tmp_path / "run")
    trainer.train()
    trained = adapter_tensors(model)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # it trained

    checkpoint = tmp_path / "run" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, files
    saved = safetensors_torch.load_file(checkpoint / "adapter_model.safetensors")
    assert set(saved) == set(trained)  # exactly the adapter (plus the task head for SEQ_CLS)
    trainer.save_model(tmp_path / "final")
    final_files = set(os.listdir(tmp_path / "final"))
    assert "adapter_model.safetensors" in final_files and "model.safetensors" not in final_files

    # Resume from step 2 on a fresh model: the same end state as the uninterrupted run.
    resumed_model, _ = make_peft_model(case)
    resumed = trainer_for(resumed_model, data, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    for key, tensor in adapter_tensors(resumed_model).items():
        torch.testing.assert_close(tensor, trained[key], rtol=1e-4, atol=1e-5, msg=key)

    # The final adapter loads in peft and in cpeft with equal outputs.
    base_model, _, _ = case()
    theirs = hf_peft.PeftModel.from_pretrained(base_model, tmp_path / "final").eval()
    base_model, _, _ = case()
    ours = cpeft.PeftModel.from_pretrained(base_model, tmp_path / "final").eval()
    batch = torch.stack([data()[i]["input_ids"] for i in range(4)])
    with torch.no_grad():
        expected = theirs(input_ids=batch).logits
        torch.testing.assert_close(ours(input_ids=batch).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            model.eval()(input_ids=batch).logits, expected, rtol=1e-5, atol=1e-5
        )
