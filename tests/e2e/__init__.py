"""End-to-end tests: real `partitioner launch` processes on real Redis and RabbitMQ."""
