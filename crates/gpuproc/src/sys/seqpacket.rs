//! SOCK_SEQPACKET sockets for message queues.
