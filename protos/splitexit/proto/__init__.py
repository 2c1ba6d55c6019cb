"""Wire protocol: `.proto` files and their generated code (proto package splitexit.v1)."""
