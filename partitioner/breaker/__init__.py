"""The circuit breaker: a pure state machine, a shared store, and the gates where it acts."""
