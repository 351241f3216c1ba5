"""Helpers the integration and fault tests share: worker processes, ledgers, relays."""
