"""What the greeter says: the signing tests change this file to tell one copy from another."""

GREETING = "hello"
