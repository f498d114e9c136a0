"""One module per task. Importing this package registers every capability (cheaply: the
pipeline modules themselves, with their heavy imports, load only when a capability is enabled)."""
