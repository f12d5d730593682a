"""The SMTP side: the connection pool, one connection's protocol, DATA encoding, throttling."""
