"""What runs the model on data, for the client's and the evaluation's Jobs: device, precision
and seeds (`runtime`), loading a base model and tokenizer (`loading`), reading and tokenizing
records (`data`), batches (`batches`), the chunked loss (`loss`), the training loop and the
evaluation loss (`training`), data parallelism (`parallel`) and drift control (`drift`: FedProx,
SCAFFOLD, whose server side the aggregator uses too)."""
