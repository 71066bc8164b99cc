"""What runs inside a Ray worker: a Tune trial, its training loop, Ray Train's set-up."""
