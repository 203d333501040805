"""A real S3 endpoint on 127.0.0.1 for tests: moto's server, and boto3 as the independent client
that judges what the watcher left in the bucket."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

# moto accepts any credentials; these are fake and only ever point at 127.0.0.1.
ACCESS_KEY = "AKIAWATCHERTEST0001"
SECRET_KEY = "watcher-test-secret-key-do-not-print"
REGION = "us-east-1"


@dataclass
class S3Server:
    """A started moto server and a boto3 client of it."""

    server: ThreadedMotoServer
    endpoint: str

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def env(self) -> dict[str, str]:
        """The standard AWS variables pointing at this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under ``prefix``, read whole."""
        c = self.client()
        found: dict[str, bytes] = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = c.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return found

    def metadata(self, bucket: str, key: str) -> dict[str, str]:
        meta: dict[str, str] = self.client().head_object(Bucket=bucket, Key=key)["Metadata"]
        return meta

    def unfinished_uploads(self, bucket: str) -> list[str]:
        """Keys of multipart uploads begun and neither completed nor aborted."""
        answer = self.client().list_multipart_uploads(Bucket=bucket)
        return [u["Key"] for u in answer.get("Uploads", [])]


def start() -> S3Server:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return S3Server(server, f"http://{host}:{port}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
