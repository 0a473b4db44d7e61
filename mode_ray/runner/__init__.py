"""The job runner: what train, moe and add-data plan (`plan_jobs`), the DAG that runs the jobs (`dag`), and one
job's trial, its `TorchTrainer` and what it leaves (`trial`)."""
