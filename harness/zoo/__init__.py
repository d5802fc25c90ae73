"""Shipped tiny models of the embedded world and the scripts that train them."""
