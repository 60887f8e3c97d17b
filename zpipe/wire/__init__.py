"""What crosses a socket: the item codec, control messages, sockets and their keys."""
