"""The client side: the Python client and `mae-client` (mae_client.py), and `embed-dataset` (dataset/).

It imports nothing of the server: the words both sides use (media types, option values) live in vocabulary.py,
which the server imports too.
"""
