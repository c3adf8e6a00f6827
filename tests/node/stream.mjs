// One streamed chat completion through the official openai package; prints what it saw as one JSON line.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.SERVICE_URL, apiKey: process.env.SERVICE_KEY, maxRetries: 0 });
const stream = await client.chat.completions.create({
  model: process.env.SERVICE_MODEL,
  messages: [{ role: "user", content: "Say hello." }],
  stream: true,
  stream_options: { include_usage: true },
});
const texts = [];
let usage = null;
let chunks = 0;
for await (const chunk of stream) {
  chunks += 1;
  for (const choice of chunk.choices) texts.push(choice.delta?.content ?? "");
  if (chunk.usage) usage = chunk.usage;
}
console.log(JSON.stringify({ text: texts.join(""), usage, chunks }));
