"""The email itself: templates rendered, the MIME message composed as a stream, previews."""
