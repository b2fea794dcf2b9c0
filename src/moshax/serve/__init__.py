"""``moshax serve``: Kyutai's chat protocol over websockets, many conversations on one batched
streaming decoder (:class:`moshax.inference.moshi_stream.DuplexLoop`)."""
