"""A Kademlia distributed hash table on a Twisted DatagramProtocol: who holds which key."""
