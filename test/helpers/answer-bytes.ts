// A document's attention for a fixed query, every layer, as raw bytes (out
// then lse, hex): what a restart or a crash must leave bit for bit.
import { tensor, type KvrecallClient, type SessionSpec } from '../../clients/ts/client.js';

export async function answerBytes(client: KvrecallClient, model: SessionSpec['model'], doc: string, q: Float32Array): Promise<string[]> {
  const s = await client.createSession({ model, documents: [doc] });
  const outs: string[] = [];
  for (let layer = 0; layer < model.layers; layer++) {
    const r = await client.attend(s.id, { layer, q: tensor('f32', [model.qHeads, model.headDim], q) });
    outs.push(Buffer.from(r.out.buffer).toString('hex') + Buffer.from(r.lse.buffer).toString('hex'));
  }
  await client.deleteSession(s.id);
  return outs;
}
