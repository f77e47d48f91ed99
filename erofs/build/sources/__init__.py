"""What a build reads: a directory (:mod:`.dir`), a tar layer (:mod:`.tar`, its bytes through :mod:`.stream`),
an OCI image layout (:mod:`.oci`); :mod:`.layers` turns ``SOURCE...`` arguments into layer readers."""
