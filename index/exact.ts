// `exact`: every token of the context. The oracle the other methods are
// judged against, and the dense-attention baseline.
import type { LayerContext, RetrievalMethod, Selection } from './method.js';

export const exact: RetrievalMethod = {
  name: 'exact',
  async select(ctx: LayerContext): Promise<Selection> {
    return {
      parts: ctx.segments.map((segment) => ({ segment, begin: 0, end: segment.tokens })),
      scanned: ctx.tokens,
    };
  },
};
