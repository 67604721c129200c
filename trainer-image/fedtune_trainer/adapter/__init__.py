"""The LoRA adapter, shared by the client, the aggregator and the evaluation: PEFT glue and the
adapter's files (`lora`), and the algebra of LoRA factors behind exact aggregation (`exact`)."""
