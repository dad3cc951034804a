-- Everything pgbeat owns lives in its schema.
DROP SCHEMA pgbeat CASCADE;
