"""Model definitions: compositions of the shared layers."""
