"""The benchmark's yardstick: a bare Flask view calling the openai client, nothing else."""

import os

import openai
from flask import Flask, jsonify, request

app = Flask(__name__)
client = openai.OpenAI(api_key="unused", base_url=os.environ["OPENAI_BASE_URL"], max_retries=0)


@app.post("/generate")
def generate():  # type: ignore[no-untyped-def]
    body = request.get_json()
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": body["prompt"]}]
    )
    return jsonify(output=completion.choices[0].message.content)
