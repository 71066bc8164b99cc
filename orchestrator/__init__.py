"""bkd's orchestration: Hydra entry points, Ray Train trials, Ray Tune + Optuna search, MLflow logging."""
