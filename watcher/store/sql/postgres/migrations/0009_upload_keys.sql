-- The temporary object key an output is being uploaded under (object storage mode), recorded
-- before the first byte is sent, so that after a crash the upload is found and aborted or
-- finished; NULL when nothing is in flight (and always on local disk).
ALTER TABLE outputs ADD COLUMN upload_key text;
