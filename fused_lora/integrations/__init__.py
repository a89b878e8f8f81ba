"""LoRA beyond one layer: whole models (`model`) and PEFT's files and models (`peft`)."""
